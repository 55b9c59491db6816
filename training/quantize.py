"""INT8 variants of the shipped classifier and autoencoder: onnxruntime static quantization (QDQ).

    python -m training.quantize classifier --model-dir models/classifier/1 --seed 0
    python -m training.quantize autoencoder --model-dir models/autoencoder/1 --seed 0
    python -m training.quantize classifier --dry-run --model-dir /tmp/copy-of-a-version   # fake data, seconds

Beside the fp32 files of a version it writes ``model.int8.onnx`` and ``manifest.int8.json``
(precision ``int8``, the file's sha256, every quality figure recomputed through onnxruntime on
the int8 file, parity and speed against the fp32 file) and an "INT8 variant" section at the end
of ``MODEL_CARD.md``. The fp32 ``model.onnx`` and ``manifest.json`` are left untouched; the
service serves the variant when its ``precision`` setting is ``int8``.

Method: ``quant_pre_process`` (shape inference and graph clean-up), then ``quantize_static``
with QDQ nodes, per-channel symmetric int8 weights in 7 bits (``reduce_range``), uint8
activations (the U8S8 kernels that AVX-512 VNNI / AVX-VNNI run fastest) and MinMax calibration
over ``--calibration-images`` training images drawn with ``--seed``: clean images for the
classifier (from the part of the training split it was trained on, never its validation or the
test set), and the training corruptions (noise, occlusions, strokes; half with their damage mask) for the autoencoder,
whose service inputs are damaged images. Same seed, data and onnxruntime version give the same
bytes.

Why 7-bit weights: on x86 CPUs without VNNI (AVX2 and plain AVX-512), onnxruntime's U8S8 kernels
sum pairs of uint8 x int8 products in 16 bits (VPMADDUBSW), which saturates with full-range
weights. With 8-bit weights the classifier v2's INT8 file scored 87.60% (argmax agreement with
FP32 91.37%) on an AVX2-only AMD EPYC, against 93.95% on a VNNI CPU; with 7-bit weights it scores
93.91% (agreement 99.79%) there. onnxruntime's documentation names ``reduce_range`` (or U8U8,
which was no faster than FP32 there) as the remedy; VNNI CPUs run the same U8S8 kernels on it.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from services.core.manifest import MANIFEST_FILE, Manifest, TrainingInfo, file_sha256
from services.core.repository import manifest_file
from training.data import Split, fake_split, load_split
from training.evaluate import (
    calibrate_ood,
    classifier_metrics,
    compare_outputs,
    energy_score,
    speed_comparison,
    to_input,
)
from training.export import CARD_FILE, command_line, markdown_table, onnx_session, run_onnx

log = logging.getLogger("quantize")

PRECISION = "int8"
INT8_FILE = "model.int8.onnx"
CARD_HEADING = "## INT8 variant"
# The bars of issue #17, checked by tests/test_quantize.py and tests/test_shipped_models.py.
MAX_ACCURACY_DROP = 0.002
MIN_ARGMAX_AGREEMENT = 0.995
MAX_PSNR_DROP_DB = 0.2
MIN_SPEEDUP = 2.0


class ArrayReader(CalibrationDataReader):
    """Feeds calibration batches (dicts of named arrays) to onnxruntime's calibrator."""

    def __init__(self, inputs: dict[str, np.ndarray], batch_size: int = 64) -> None:
        n = len(next(iter(inputs.values())))
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{k: v[s : s + batch_size] for k, v in inputs.items()} for s in range(0, n, batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def validation_split(manifest: Manifest, n_train: int) -> tuple[int, int]:
    """(size, seed) of the classifier's held-out validation part, as train_classifier drew it."""
    extra = (manifest.training.model_extra or {}) if manifest.training else {}
    seed = manifest.training.seed if manifest.training else 0
    return min(int(extra.get("val_size", 5000)), n_train // 2), seed


def classifier_calibration(train: Split, n: int, seed: int, manifest: Manifest) -> dict[str, np.ndarray]:
    """``n`` clean training images the classifier was trained on (its validation part left out)."""
    val_size, split_seed = validation_split(manifest, len(train))
    trained_on = np.random.default_rng(split_seed).permutation(len(train))[val_size:]
    idx = np.random.default_rng(seed).choice(trained_on, size=min(n, len(trained_on)), replace=False)
    return {"image": to_input(train.images[np.sort(idx)])}


def autoencoder_calibration(train: Split, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` training images under the training corruptions; half carry their damage mask, as service calls may."""
    import torch

    from training.corruptions import corrupt, stroke_bank

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(train), size=min(n, len(train)), replace=False))
    g = torch.Generator().manual_seed(seed)
    clean = torch.from_numpy(to_input(train.images[idx]))
    damaged, mask, _ = corrupt(clean, stroke_bank(256, seed + 7), g)
    mask = mask.numpy().copy()
    mask[rng.random(len(mask)) < 0.5] = 0.0
    return {"image": damaged.numpy().astype(np.float32), "mask": mask.astype(np.float32)}


# The autoencoder's GroupNorm (exported as InstanceNormalization between Reshapes) and SiLU stay
# fp32: onnxruntime cannot share a weight's quantization parameters through those Reshapes, and
# its convolutions are where the time goes.
OP_TYPES: dict[str, list[str] | None] = {
    "classifier": None,
    "autoencoder": ["Conv", "ConvTranspose", "Concat", "MaxPool"],
}


def quantize(
    fp32_path: Path, out_path: Path, calibration: dict[str, np.ndarray], op_types: list[str] | None = None
) -> dict[str, Any]:
    """Write the int8 QDQ model to ``out_path``; returns the settings used (for the manifest).

    ``op_types`` limits which operators are quantized (None: every one onnxruntime can).
    """
    config: dict[str, Any] = {
        "tool": f"onnxruntime.quantization.quantize_static (onnxruntime {ort.__version__})",
        "format": "QDQ",
        "per_channel": True,
        "weight_type": "int8 (symmetric, 7-bit range: reduce_range)",
        "activation_type": "uint8 (asymmetric)",
        "calibration_method": "MinMax",
        "calibration_rows": int(len(next(iter(calibration.values())))),
        "pre_process": "onnxruntime.quantization.shape_inference.quant_pre_process",
        "op_types_to_quantize": op_types or "all",
    }
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_path),
            ArrayReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # 7-bit weights: no saturation in the U8S8 kernels of CPUs without VNNI (see the module docstring).
            reduce_range=True,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=op_types,
        )
    return config


def classifier_figures(
    fp32_path: Path, int8_path: Path, manifest: Manifest, train: Split, test: Split, seed: int
) -> dict[str, Any]:
    """Test accuracy of both files, their agreement, the int8 OOD threshold and flag rate."""
    fp32 = run_onnx(onnx_session(fp32_path), {"image": to_input(test.images)})[0]
    int8 = run_onnx(onnx_session(int8_path), {"image": to_input(test.images)})[0]
    metrics = classifier_metrics(int8, test.labels)
    metrics.pop("confusion_matrix")
    reference = classifier_metrics(fp32, test.labels)["accuracy"]
    metrics["fp32_accuracy"] = reference
    metrics["accuracy_drop"] = round(reference - metrics["accuracy"], 4)
    metrics["parity_vs_fp32"] = compare_outputs(fp32, int8, argmax=True)
    # The OOD threshold is recalibrated on the int8 scores with the fp32 rule (95th percentile on
    # the classifier's held-out validation images), so the flag keeps its meaning.
    val_size, split_seed = validation_split(manifest, len(train))
    val = train.images[np.random.default_rng(split_seed).permutation(len(train))[:val_size]]
    names = [spec.name for spec in manifest.outputs]
    if "ood_score" in names:
        # The graph computes its own score (classifier v2): calibrate that output, not the energy.
        index = names.index("ood_score")
        val_scores = run_onnx(onnx_session(int8_path), {"image": to_input(val)})[index]
        threshold = float(np.quantile(val_scores, 0.95))
        test_scores = run_onnx(onnx_session(int8_path), {"image": to_input(test.images)})[index]
    else:
        threshold = calibrate_ood(run_onnx(onnx_session(int8_path), {"image": to_input(val)})[0])
        test_scores = energy_score(int8)
    metrics["ood_threshold"] = round(threshold, 4)
    metrics["ood_test_flagged"] = round(float((test_scores > threshold).mean()), 4)
    return metrics


def autoencoder_figures(fp32_path: Path, int8_path: Path, manifest: Manifest, test: Split) -> dict[str, Any]:
    """Every figure of the autoencoder's card, recomputed on the int8 file, with the PSNR drops."""
    from training.train_autoencoder import evaluate, reconstruction_error, restore

    seed = manifest.training.seed if manifest.training else 0
    # The judge the fp32 figures were measured with (versions before it was recorded used classifier 1).
    classifier = Path("models") / manifest.metrics.get("classifier", "classifier/1")
    metrics, _ = evaluate(int8_path, test, classifier if classifier.is_dir() else None, seed)
    reference, _ = evaluate(fp32_path, test, None, seed)
    for key in ("psnr_sigma0.1_db", "psnr_sigma0.3_db", "occlusion_psnr_with_mask_db", "psnr_clean_db"):
        metrics[f"fp32_{key}"] = reference[key]
        metrics[f"{key}_drop"] = round(reference[key] - metrics[key], 2)
    clean = to_input(test.images)
    probe = {"image": clean[:1000], "mask": np.zeros_like(clean[:1000])}
    fp32 = run_onnx(onnx_session(fp32_path), probe)[0]
    int8 = run_onnx(onnx_session(int8_path), probe)[0]
    metrics["parity_vs_fp32"] = compare_outputs(fp32, int8)
    # Same rule as the fp32 threshold (99th percentile of the reconstruction error on clean test images).
    errors = reconstruction_error(restore(onnx_session(int8_path), clean), clean)
    metrics["ood_threshold"] = float(np.percentile(errors, 99))
    return metrics


def card_section(manifest: Manifest, fp32: Manifest) -> str:
    """The model card's INT8 section: how it was made, its checksum and every figure beside fp32's."""
    m, q = manifest.metrics, manifest.extra["quantization"]
    assert manifest.training is not None
    if manifest.task == "image-classification":
        rows = [
            ("test accuracy", f"{m['fp32_accuracy']:.2%}", f"{m['accuracy']:.2%}"),
            ("argmax agreement with fp32", "", f"{m['parity_vs_fp32']['argmax_agreement']:.2%}"),
            ("OOD threshold (energy)", f"{fp32.ood.threshold:.4f}" if fp32.ood else "", f"{m['ood_threshold']:.4f}"),
            ("test images flagged OOD", "", f"{m['ood_test_flagged']:.1%}"),
        ]
    else:
        rows = [
            (key.replace("_db", " (dB)").replace("_", " "), f"{m['fp32_' + key]:.2f}", f"{m[key]:.2f}")
            for key in ("psnr_sigma0.1_db", "psnr_sigma0.3_db", "occlusion_psnr_with_mask_db", "psnr_clean_db")
        ]
        rows.append(
            (
                "classifier accuracy on restored sigma-0.3",
                f"{fp32.metrics.get('classifier_accuracy_restored_sigma0.3', float('nan')):.2%}",
                f"{m.get('classifier_accuracy_restored_sigma0.3', float('nan')):.2%}",
            )
        )
    rows.append(("max abs output difference vs fp32", "", f"{m['parity_vs_fp32']['max_abs_diff']:.3g}"))
    for batch, s in m.get("speed_1thread", {}).items():
        int8 = f"{s['int8_ms']:.3f} ({s['speedup']:.2f}x)"
        rows.append((f"ms per call, batch {batch}, 1 thread", f"{s['fp32_ms']:.3f}", int8))
    table = markdown_table(["figure (10k test set, onnxruntime)", "fp32", "int8"], rows)
    return f"""{CARD_HEADING}

`model.int8.onnx` (`manifest.int8.json`, precision `int8`) is this version statically quantized
with onnxruntime: QDQ, per-channel int8 weights in a 7-bit range (`reduce_range`: CPUs without VNNI
saturate with full-range weights), uint8 activations, MinMax calibration over
{q["calibration_rows"]:,} training images ({q["calibration_data"]}). Made by
`{manifest.training.command}` ({q["tool"]}, {manifest.training.duration_s:.0f} s).
Serve it with `--precision int8` (it is for CPUs: the fp32 file is the one for CUDA).

- sha256 of `model.int8.onnx`: `{manifest.sha256}`

{table}

Speed: {manifest.extra["speed_note"]}
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["classifier", "autoencoder"])
    parser.add_argument("--model-dir", type=Path, default=None, help="the fp32 version directory (default models/M/1)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--calibration-images", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--speed-seconds", type=float, default=3.0, help="timing per measurement (0: leave timing to the benchmark)"
    )
    parser.add_argument("--dry-run", action="store_true", help="fake data, few images, short timings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model_dir: Path = args.model_dir or Path(f"models/{args.model}/1")
    fp32 = Manifest.read(model_dir / MANIFEST_FILE)
    fp32_path = model_dir / fp32.file
    if args.dry_run:
        train, test = fake_split(512, args.seed), fake_split(256, args.seed + 1)
        args.calibration_images = min(args.calibration_images, 64)
        args.speed_seconds = min(args.speed_seconds, 0.05) if args.speed_seconds else 0.0
    else:
        train, test = load_split("train", args.data_dir), load_split("test", args.data_dir)
    started = time.perf_counter()
    if args.model == "classifier":
        calibration = classifier_calibration(train, args.calibration_images, args.seed, fp32)
        what = "clean, from the part of the training split the classifier was trained on"
    else:
        calibration = autoencoder_calibration(train, args.calibration_images, args.seed)
        what = "under the training corruptions, half with their damage mask"
    # Written under a hidden name and moved into place at the end: a re-quantized version keeps a
    # matching pair (model.int8.onnx and its manifest's checksum) for any service that loads it meanwhile.
    final_path = model_dir / INT8_FILE
    int8_path = model_dir / f".{INT8_FILE}.{os.getpid()}.partial.onnx"
    config = quantize(fp32_path, int8_path, calibration, OP_TYPES[args.model])
    duration = time.perf_counter() - started
    config["calibration_data"] = f"{what}; {train.source}"
    log.info("quantized %s -> %s in %.1f s", fp32_path, final_path, duration)

    if args.model == "classifier":
        metrics = classifier_figures(fp32_path, int8_path, fp32, train, test, args.seed)
        example = {"image": to_input(test.images[:64])}
    else:
        metrics = autoencoder_figures(fp32_path, int8_path, fp32, test)
        x = to_input(test.images[:64])
        example = {"image": x, "mask": np.zeros_like(x)}
    if args.speed_seconds > 0:
        metrics["speed_1thread"] = speed_comparison(fp32_path, int8_path, example, (1, 64), args.speed_seconds)
        log.info("speed: %s", metrics["speed_1thread"])
    log.info("metrics: %s", {k: v for k, v in metrics.items() if not isinstance(v, dict)})
    command = command_line(argv, module="quantize")
    ood = fp32.ood.model_copy(update={"threshold": metrics["ood_threshold"]}) if fp32.ood else None
    manifest = fp32.model_copy(
        update={
            "file": INT8_FILE,
            "sha256": file_sha256(int8_path),
            "precision": PRECISION,
            "ood": ood,
            "metrics": metrics,
            "training": TrainingInfo(
                command=command,
                seed=args.seed,
                data=train.source,
                epochs=0,
                duration_s=round(duration, 1),
                hardware=f"{platform.machine()} CPU ({platform.processor() or 'unknown'})",
                torch_version="none (onnxruntime quantization)",
                onnxruntime_version=ort.__version__,
                fp32_sha256=fp32.sha256,
            ),
            "extra": {
                **fp32.extra,
                "quantization": config,
                "speed_note": (
                    "one onnxruntime thread, in process, median of five timed windows on the machine that quantized "
                    "(int8 pays off on CPUs with VNNI); "
                    if args.speed_seconds > 0
                    else "not timed here (a shared machine times nothing reliably); "
                )
                + "`python benchmarks/model_speed.py` measures fp32 against int8 in process and through the "
                "service (BENCHMARKS.md).",
            },
        }
    )
    # The old variant goes first (absent for a moment, never mismatched), then the new file, then
    # its manifest, which is what makes the variant visible (ModelRepository.precisions).
    (model_dir / manifest_file(PRECISION)).unlink(missing_ok=True)
    int8_path.replace(final_path)
    int8_path = final_path
    manifest.write(model_dir / manifest_file(PRECISION))
    card_path = model_dir / CARD_FILE
    card = card_path.read_text() if card_path.exists() else ""
    if CARD_HEADING in card:
        card = card[: card.index(CARD_HEADING)]
    card_path.write_text(card.rstrip("\n") + "\n\n" + card_section(manifest, fp32))
    log.info("wrote %s and %s (sha256 %s)", int8_path, manifest_file(PRECISION), manifest.sha256)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
