from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    ServiceProcess,
    make_tiny_autoencoder,
    make_tiny_classifier,
    make_tiny_denoiser,
    make_tiny_gan,
    start_service,
)

# The Docker end-to-end module needs images built by scripts/docker-e2e.sh, which sets this.
collect_ignore = [] if os.environ.get("NNSERVE_E2E_COMPOSE") == "1" else ["e2e"]


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding a tiny linear classifier (versions 1 and 2) and a stand-in restorer."""
    root = tmp_path_factory.mktemp("repository")
    make_tiny_classifier(root, version=1, seed=1)
    make_tiny_classifier(root, version=2, seed=2)
    make_tiny_autoencoder(root, version=1)
    make_tiny_gan(root)
    make_tiny_denoiser(root)
    return root


@pytest.fixture(scope="module")
def classify_server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The classify service with default settings on the tiny classifier."""
    server = start_service("services.classify", tiny_repository, tmp_path_factory.mktemp("classify"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def restore_server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The restore service with default settings on the stand-in restorer."""
    server = start_service("services.restore", tiny_repository, tmp_path_factory.mktemp("restore"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def generate_server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The generate service on the stand-in GAN and denoiser."""
    server = start_service(
        "services.generate",
        tiny_repository,
        tmp_path_factory.mktemp("generate"),
        "--max-count",
        "16",
        "--max-step-rows-per-request",
        "20000",
    )
    yield server
    server.stop()
