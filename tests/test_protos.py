"""The generated code in services/proto is exactly what tools/gen_protos.py makes from protos/."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    out = tmp_path / "proto"
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--out", str(out)], check=True, cwd=ROOT)
    committed = ROOT / "services" / "proto"
    generated = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    present = {p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert generated == present, "files differ: run `make protos` and commit services/proto"
    stale = [str(p) for p in sorted(generated) if (out / p).read_bytes() != (committed / p).read_bytes()]
    assert not stale, f"generated code drifted from protos/ in {stale}: run `make protos` and commit services/proto"


def test_every_proto_declares_a_versioned_package() -> None:
    for proto in (ROOT / "protos" / "nnserve").rglob("*.proto"):
        assert re.search(r"^package nnserve(\.[a-z_]+)*\.v[0-9]+;$", proto.read_text(), re.M), proto
