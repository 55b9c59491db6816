"""nnserve promote: a version copied under a new number with its manifests rewritten, verified,
and picked up by a running service; a hand copy is refused, as the rule says."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from services.cli import main
from services.client import ClassifyClient
from services.core.errors import ModelLoadError
from services.core.repository import ModelRepository
from tests.helpers import make_tiny_classifier, start_service


@pytest.fixture()
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    make_tiny_classifier(root, version=1, seed=1)
    return root


def test_promote_copies_and_rewrites_every_manifest(repository: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    source = repository / "classifier" / "1"
    # A precision variant beside the fp32 files is promoted with it.
    int8 = json.loads((source / "manifest.json").read_text()) | {"precision": "int8"}
    (source / "manifest.int8.json").write_text(json.dumps(int8, indent=2) + "\n")
    assert main(["promote", "classifier", "1", "5", "--model-repository", str(repository)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"classifier/1 -> classifier/5 (fp32, int8) in {repository / 'classifier' / '5'}"
    )
    repo = ModelRepository(repository)
    assert repo.versions("classifier") == [1, 5]
    for precision in ("fp32", "int8"):
        promoted = repo.resolve("classifier", 5, precision)
        original = repo.resolve("classifier", 1, precision)
        assert promoted.manifest.version == 5
        assert promoted.manifest.model_dump(exclude={"version"}) == original.manifest.model_dump(exclude={"version"})
    assert not [p for p in (repository / "classifier").iterdir() if p.name.startswith(".")]  # no staging left
    # Without a target: one above the highest.
    assert main(["promote", "classifier", "5", "--model-repository", str(repository)]) == 0
    assert repo.versions("classifier") == [1, 5, 6] and repo.resolve("classifier", 6).manifest.version == 6


def test_a_hand_copy_is_refused_and_the_message_says_why(repository: Path) -> None:
    shutil.copytree(repository / "classifier" / "1", repository / "classifier" / "2")
    with pytest.raises(ModelLoadError) as refused:
        ModelRepository(repository).resolve("classifier", 2)
    assert str(refused.value).endswith(
        "manifest says classifier/1, directory is classifier/2 (a hand copy? remove it and run: "
        "nnserve promote classifier 1 2)"
    )
    # Doing what the message says works.
    shutil.rmtree(repository / "classifier" / "2")
    assert main(["promote", "classifier", "1", "2", "--model-repository", str(repository)]) == 0
    assert ModelRepository(repository).resolve("classifier", 2).manifest.version == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["classifier", "1", "1"], "already exists; a version is never overwritten (next free version: 2)"),
        (["classifier", "7", "8"], "cannot promote classifier/7: model 'classifier' has no version 7"),
        (["nothing", "1", "2"], "cannot promote nothing/1"),
        (["classifier", "1", "0"], "argument to_version: 0 is out of range (>= 1)"),
    ],
)
def test_bad_promotions_are_one_line_and_exit_2(repository: Path, args: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    try:
        code = main(["promote", *args, "--model-repository", str(repository)])
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err
    assert ModelRepository(repository).versions("classifier") == [1]


def test_a_corrupt_source_is_not_promoted(repository: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = repository / "classifier" / "1" / "model.onnx"
    model.write_bytes(model.read_bytes() + b"tampered")
    assert main(["promote", "classifier", "1", "2", "--model-repository", str(repository)]) == 2
    assert "sha256" in capsys.readouterr().err
    assert not (repository / "classifier" / "2").exists()


def test_a_running_service_picks_up_the_promoted_version(repository: Path, tmp_path: Path) -> None:
    server = start_service(
        "services.classify", repository, tmp_path / "serve", "--model-poll-interval-s", "0.2", "--metrics-port", "none"
    )
    try:
        with ClassifyClient(server.address) as client:
            tensor = np.zeros((1, 28, 28), np.uint8)
            assert client.classify(tensor=tensor, timeout=10).model_version == 1
            assert main(["promote", "classifier", "1", "3", "--model-repository", str(repository)]) == 0
            deadline = time.monotonic() + 60
            while client.classify(tensor=tensor, timeout=10).model_version != 3:
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.2)
        assert "rejected" not in server.log()
    finally:
        assert server.stop() == 0
