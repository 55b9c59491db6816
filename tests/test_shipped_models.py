"""The models shipped in models/: files match their manifests, and the quality bars hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.core.manifest import Manifest
from services.core.repository import ModelRepository
from tests.helpers import ROOT
from training.data import DEFAULT_DATA_DIR, file_sha256, load_split
from training.evaluate import classifier_logits, classifier_metrics

MODELS = ROOT / "models"
needs_data = pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; CI installs it)",
)


def shipped_versions() -> list[Path]:
    return sorted(p.parent for p in MODELS.glob("*/*/manifest.json"))


@pytest.mark.parametrize("directory", shipped_versions(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_files_match_their_manifest(directory: Path) -> None:
    manifest = Manifest.read(directory / "manifest.json")
    assert file_sha256(directory / manifest.file) == manifest.sha256
    assert ModelRepository(MODELS).resolve(manifest.name, manifest.version).manifest == manifest
    card = (directory / "MODEL_CARD.md").read_text()
    assert manifest.sha256 in card
    assert manifest.training is not None and manifest.training.command.startswith("python -m training.")


def test_classifier_is_shipped() -> None:
    assert ModelRepository(MODELS).resolve("classifier").version >= 1


@needs_data
@pytest.mark.slow
def test_classifier_accuracy_bar_through_onnxruntime() -> None:
    """>= 93.0% on the 10k test set through onnxruntime, <= 1M parameters, figures as recorded."""
    version = ModelRepository(MODELS).resolve("classifier")
    test = load_split("test")
    metrics = classifier_metrics(classifier_logits(version.directory, test.images), test.labels)
    assert metrics["examples"] == 10_000
    assert metrics["accuracy"] >= 0.930, json.dumps(metrics["per_class_accuracy"])
    assert version.manifest.parameters <= 1_000_000
    assert metrics["accuracy"] == pytest.approx(version.manifest.metrics["accuracy"], abs=1e-4)
    assert version.manifest.metrics["parity"]["argmax_agreement"] == 1.0
