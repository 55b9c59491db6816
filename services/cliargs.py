"""Argument parsing shared by the ``nnserve`` commands (cli.py and loadtest.py): help that shows
defaults, number types whose errors name the range, and the exit-status epilog."""

from __future__ import annotations

import argparse
from typing import Any

EXIT_STATUS = """\
exit status: 0 done; 1 the call failed (the server's status and message are printed);
2 bad usage, a file that cannot be read or written, or a service that cannot start."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and ends each option's help with its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        if "default" in text or unset or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def bounded(kind: type, low: float | None = None, high: float | None = None) -> Any:
    """An argparse type: ``kind`` within [low, high], with an error that names the range."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if (low is not None and value < low) or (high is not None and value > high) or value != value:
            span = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{text} is out of range ({span})")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
