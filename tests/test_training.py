"""Training scripts: real (tiny) training, export and parity on fake data, in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from services.core.manifest import Manifest
from services.core.repository import ModelRepository
from training import train_classifier
from training.data import fake_split, read_idx
from training.export import export_onnx


def test_classifier_dry_run_trains_exports_and_passes_parity(tmp_path: Path) -> None:
    out = tmp_path / "classifier" / "1"
    assert train_classifier.main(["--dry-run", "--out", str(out), "--seed", "3"]) == 0
    manifest = Manifest.read(out / "manifest.json")
    assert manifest.name == "classifier" and manifest.version == 1 and manifest.opset == 18
    assert [s.model_dump(exclude_none=True) for s in manifest.inputs] == [
        {"name": "image", "dtype": "float32", "shape": [-1, 1, 28, 28]}
    ]
    assert manifest.outputs[0].shape == [-1, 10]
    assert manifest.metrics["parity"]["argmax_agreement"] == 1.0
    assert manifest.metrics["parity"]["allclose_rtol1e-3_atol1e-5"] is True
    assert manifest.ood is not None and np.isfinite(manifest.ood.threshold)
    assert manifest.training is not None and "--dry-run" in manifest.training.command
    # The artifact passes the serving side's own checks, and the exported graph has a dynamic batch.
    version = ModelRepository(tmp_path).resolve("classifier")
    session = ort.InferenceSession(str(version.onnx_path))
    for batch in (1, 5):
        assert session.run(None, {"image": np.zeros((batch, 1, 28, 28), np.float32)})[0].shape == (batch, 10)
    card = (out / "MODEL_CARD.md").read_text()
    assert manifest.sha256 in card and "{sha256}" not in card
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    # The fake data is learnable: a dry run already beats chance clearly.
    assert manifest.metrics["accuracy"] > 0.3


def test_idx_reader_round_trip(tmp_path: Path) -> None:
    import gzip

    images = fake_split(5).images
    header = bytes([0, 0, 0x08, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    path = tmp_path / "images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + images.tobytes())
    np.testing.assert_array_equal(read_idx(path), images)


def test_a_version_is_published_whole(tmp_path: Path) -> None:
    """Until its manifest is written a version is out of the repository's sight (a version directory
    without one is an error for every service that polls the repository); then one rename publishes it."""
    from training.export import StagedVersion

    assert train_classifier.main(["--dry-run", "--out", str(tmp_path / "classifier" / "1"), "--seed", "3"]) == 0
    repository = ModelRepository(tmp_path)
    staged = StagedVersion(tmp_path / "classifier" / "2")
    assert staged.path.name == "2" and staged.path.parent.parent == tmp_path / "classifier"
    for name in ("model.onnx", "manifest.json", "MODEL_CARD.md"):  # version 1's files, half written as version 2
        (staged.path / name).write_bytes((tmp_path / "classifier" / "1" / name).read_bytes())
        assert repository.versions("classifier") == [1]
        assert repository.resolve("classifier").version == 1
    staged.publish()
    assert repository.versions("classifier") == [1, 2]
    assert sorted(p.name for p in (tmp_path / "classifier").iterdir()) == ["1", "2"]
    # A re-export replaces the version it names.
    again = StagedVersion(tmp_path / "classifier" / "2")
    (again.path / "marker").write_text("new")
    again.publish()
    assert [p.name for p in (tmp_path / "classifier" / "2").iterdir()] == ["marker"]
    assert sorted(p.name for p in (tmp_path / "classifier").iterdir()) == ["1", "2"]


def _check_artifact(out: Path, name: str) -> Manifest:
    manifest = Manifest.read(out / "manifest.json")
    assert manifest.name == name
    assert manifest.metrics["parity"]["allclose_rtol1e-3_atol1e-5"] is True
    version = ModelRepository(out.parent.parent).resolve(name)
    assert version.manifest == manifest
    assert manifest.sha256 in (out / "MODEL_CARD.md").read_text()
    return manifest


def test_autoencoder_dry_run(tmp_path: Path) -> None:
    from training import train_autoencoder

    out = tmp_path / "autoencoder" / "1"
    assert train_autoencoder.main(["--dry-run", "--out", str(out)]) == 0
    manifest = _check_artifact(out, "autoencoder")
    assert [s.name for s in manifest.inputs] == ["image", "mask"]
    assert manifest.ood is not None and manifest.ood.score == "reconstruction_mse"
    assert (out / "before_after.png").exists()
    session = ort.InferenceSession(str(out / "model.onnx"))
    restored = session.run(
        None, {"image": np.full((3, 1, 28, 28), 0.5, np.float32), "mask": np.zeros((3, 1, 28, 28), np.float32)}
    )[0]
    assert restored.shape == (3, 1, 28, 28) and 0.0 <= restored.min() and restored.max() <= 1.0


def test_autoencoder_grows_from_an_exported_version(tmp_path: Path) -> None:
    """A restorer loads an exported one with more residual blocks and computes what the graph does,
    and a run started from it (new blocks, the PSNR loss) records its recipe in the manifest."""
    from training import train_autoencoder
    from training.models.autoencoder import Restorer, from_onnx

    torch.manual_seed(0)
    grown = Restorer((8, 16, 16), mid_blocks=1, fine_blocks=1)
    with torch.no_grad():  # no block at the identity, so a misplaced weight would show
        for p in grown.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, mask = torch.rand(3, 1, 28, 28), (torch.rand(3, 1, 28, 28) < 0.2).float()
    export_onnx(grown, {"image": x, "mask": mask}, ["restored"], tmp_path / "grown.onnx")
    expected = ort.InferenceSession(str(tmp_path / "grown.onnx")).run(None, {"image": x.numpy(), "mask": mask.numpy()})
    loaded = from_onnx(tmp_path / "grown.onnx", mid_blocks=2, fine_blocks=2).eval()
    np.testing.assert_allclose(loaded(x, mask).detach().numpy(), expected[0], atol=1e-5)
    with pytest.raises(ValueError, match="residual blocks in fine2, cannot load it into 0"):
        from_onnx(tmp_path / "grown.onnx", mid_blocks=1, fine_blocks=0)

    out = tmp_path / "autoencoder" / "2"
    args = ["--dry-run", "--out", str(out), "--init-from", str(tmp_path / "grown.onnx")]
    args += ["--mid-blocks", "1", "--fine-blocks", "2", "--pixel-loss", "psnr", "--semantic-weight", "0"]
    assert train_autoencoder.main(args) == 0
    manifest = _check_artifact(out, "autoencoder")
    assert manifest.training is not None and manifest.training.model_extra is not None
    recipe = manifest.training.model_extra
    assert (recipe["widths"], recipe["fine_blocks"], recipe["pixel_loss"]) == ([8, 16, 16], 2, "psnr")
    assert "minus each image's PSNR" in (out / "MODEL_CARD.md").read_text()


def test_gan_dry_run(tmp_path: Path) -> None:
    from training import train_gan

    out = tmp_path / "gan_generator" / "1"
    checkpoint = tmp_path / "gan.pt"
    args = ["--dry-run", "--out", str(out), "--r1-every", "2", "--diffaug", "translation,cutout"]
    assert train_gan.main([*args, "--checkpoint", str(checkpoint)]) == 0
    manifest = _check_artifact(out, "gan_generator")
    assert manifest.training is not None and manifest.training.model_extra is not None
    assert manifest.training.model_extra["r1_gamma"] > 0 and manifest.training.model_extra["aux_weight"] < 1
    assert [(s.name, s.dtype) for s in manifest.inputs] == [("z", "float32"), ("label", "int64")]
    session = ort.InferenceSession(str(out / "model.onnx"))
    z = np.random.default_rng(0).standard_normal((4, manifest.extra["latent_dim"])).astype(np.float32)
    a = session.run(None, {"z": z, "label": np.arange(4)})[0]
    b = session.run(None, {"z": z, "label": np.arange(4)})[0]
    assert a.shape == (4, 1, 28, 28) and np.array_equal(a, b)  # no randomness inside the graph
    assert (out / "sample_grid.png").exists()
    # An interrupted run exports from its checkpoint: the same weights, and the recipe it was trained
    # with rather than the finalizing command's flags.
    again = tmp_path / "again" / "gan_generator" / "1"
    finalize = ["--dry-run", "--out", str(again), "--finalize-from", str(checkpoint), "--r1-every", "9"]
    assert train_gan.main(finalize) == 0
    redone = _check_artifact(again, "gan_generator")
    assert redone.training is not None and redone.training.model_extra is not None
    recipe = redone.training.model_extra
    assert recipe["r1_every"] == 2 and recipe["diffaug"] == "translation,cutout"
    c = ort.InferenceSession(str(again / "model.onnx")).run(None, {"z": z, "label": np.arange(4)})[0]
    np.testing.assert_allclose(c, a, atol=1e-6)


def test_diffusion_dry_run(tmp_path: Path) -> None:
    from training import train_diffusion

    out = tmp_path / "diffusion_denoiser" / "1"
    args = ["--dry-run", "--out", str(out), "--widths", "8", "8", "8", "--checkpoint", str(tmp_path / "ckpt.pt")]
    assert train_diffusion.main(args) == 0
    manifest = _check_artifact(out, "diffusion_denoiser")
    extra = manifest.extra
    assert len(extra["alphas_cumprod"]) == extra["num_train_timesteps"] == 1000
    assert extra["prediction_type"] == "epsilon" and extra["null_class"] == 10
    assert [(s.name, s.dtype) for s in manifest.inputs] == [("x_t", "float32"), ("t", "int64"), ("label", "int64")]
    # --export-only re-exports from the checkpoint without training, replacing the version
    assert train_diffusion.main([*args, "--export-only"]) == 0
    assert _check_artifact(out, "diffusion_denoiser").sha256 == manifest.sha256
    assert sorted(p.name for p in out.parent.iterdir()) == ["1"]  # no staging directory left behind
