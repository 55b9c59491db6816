"""Pieces every training script shares: flags, set-up, data, EMA weights."""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import torch

from training.data import Split, fake_split, load_split


def base_parser(
    doc: str | None, *, epochs: int, lr: float, batch_size: int, with_classifier: bool = True
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None, help="directory of Fashion-MNIST IDX files")
    p.add_argument("--out", type=Path, default=None, help="model version directory to write")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all available)")
    if with_classifier:
        p.add_argument(
            "--classifier", type=Path, default=Path("models/classifier/1"), help="shipped classifier, for evaluation"
        )
    p.add_argument("--dry-run", action="store_true", help="tiny fake data and few steps, for smoke tests")
    return p


def finish_args(args: argparse.Namespace, name: str, dry_epochs: int = 1) -> argparse.Namespace:
    if args.dry_run:
        args.epochs = min(args.epochs, dry_epochs)
    if args.out is None:
        args.out = Path(f"runs/dry-run/{name}/1" if args.dry_run else f"models/{name}/1")
    return args


def setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)


def load_data(args: argparse.Namespace, n_fake: tuple[int, int] = (512, 256)) -> tuple[Split, Split]:
    """(train, test): the real splits, or tiny fake ones under --dry-run."""
    if args.dry_run:
        return fake_split(n_fake[0], args.seed), fake_split(n_fake[1], args.seed + 1)
    return load_split("train", args.data_dir), load_split("test", args.data_dir)


class EMA:
    """Exponential moving average of a module's weights (buffers copied as they are)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
