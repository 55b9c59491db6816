"""Model quality figures computed from the exported ONNX files (never hard-coded).

``python -m training.evaluate classifier --model-dir models/classifier/1`` prints the figures;
the training scripts call the same functions and store their results in the manifest.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from training.data import LABELS, Split, load_split
from training.export import MODEL_FILE, onnx_session, run_onnx


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1], the models' input contract."""
    return (images.astype(np.float32) / 255.0)[:, None]


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Energy OOD score, -logsumexp(logits) (Liu et al. 2020): higher means more out-of-distribution."""
    m = logits.max(axis=1, keepdims=True)
    return -(m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))


def classifier_logits(model_dir: Path, images: np.ndarray) -> np.ndarray:
    """Logits of the exported classifier over uint8 images."""
    session = onnx_session(model_dir / MODEL_FILE)
    return run_onnx(session, {"image": to_input(images)})[0]


def classifier_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, per-class accuracy and the confusion matrix."""
    pred = logits.argmax(axis=1)
    per_class = {LABELS[c]: round(float((pred[labels == c] == c).mean()), 4) for c in range(len(LABELS))}
    confusion = np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    return {
        "accuracy": round(float((pred == labels).mean()), 4),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "examples": int(len(labels)),
    }


def synthetic_ood(n: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs that are plainly not clothing, to report how often the OOD flag catches them."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    blank = np.full((n, 28, 28), 255, dtype=np.uint8)
    checker = np.indices((28, 28)).sum(axis=0) // 4 % 2 * 255
    checkers = np.broadcast_to(checker.astype(np.uint8), (n, 28, 28)).copy()
    return {"uniform_noise": noise, "all_white": blank, "checkerboard": checkers}


def calibrate_ood(val_logits: np.ndarray, quantile: float = 0.95) -> float:
    """Energy threshold that keeps ``quantile`` of in-distribution validation images unflagged."""
    return float(np.quantile(energy_score(val_logits), quantile))


def ood_report(model_dir: Path, threshold: float, test: Split, seed: int = 0) -> dict[str, float]:
    """Fraction flagged as OOD: the in-distribution test set and each synthetic OOD set."""
    report = {"test_flagged": float((energy_score(classifier_logits(model_dir, test.images)) > threshold).mean())}
    for name, images in synthetic_ood(500, seed).items():
        report[f"{name}_flagged"] = float((energy_score(classifier_logits(model_dir, images)) > threshold).mean())
    return {k: round(v, 4) for k, v in report.items()}


def psnr(restored: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for [0,1] images (MSE floored at 1e-10)."""
    mse = ((restored.astype(np.float64) - clean) ** 2).reshape(len(clean), -1).mean(axis=1)
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def _box_mean(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k windows ('valid' positions) of [N, H, W] arrays, via summed-area tables."""
    c = np.pad(x, ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
    return (c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]) / (k * k)


def ssim(restored: np.ndarray, clean: np.ndarray, window: int = 7) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004) with a uniform 7x7 window, data range 1, as skimage's default."""
    a = restored.reshape(len(restored), 28, 28).astype(np.float64)
    b = clean.reshape(len(clean), 28, 28).astype(np.float64)
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _box_mean(a, window), _box_mean(b, window)
    n = window * window
    cov = n / (n - 1)  # sample covariance, as skimage
    var_a = (_box_mean(a * a, window) - mu_a**2) * cov
    var_b = (_box_mean(b * b, window) - mu_b**2) * cov
    cov_ab = (_box_mean(a * b, window) - mu_a * mu_b) * cov
    s = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.reshape(len(s), -1).mean(axis=1)


def classifier_with_features(model_dir: Path) -> ort.InferenceSession:
    """The shipped classifier with its penultimate features exposed as a second output."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_dir / MODEL_FILE))
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers[model.graph.output[0].name]
    while node.op_type not in ("Gemm", "MatMul"):
        node = producers[node.input[0]]
    features = node.input[0]
    model.graph.output.append(helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def logits_and_features(session: ort.InferenceSession, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N,1,28,28] in [0,1] -> (logits, penultimate features)."""
    logits, features = run_onnx(session, {"image": images.astype(np.float32)})
    return logits, features.reshape(len(features), -1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr sqrt(A B) = sum of sqrt of eigenvalues of sqrt(A) B sqrt(A), which is symmetric PSD.
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    return float(
        ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()
    )


def class_consistency(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """How often the classifier labels a generated image as the class it was asked for."""
    pred = logits.argmax(1)
    return {
        "class_consistency": round(float((pred == labels).mean()), 4),
        "per_class_consistency": {
            LABELS[c]: round(float((pred[labels == c] == c).mean()), 4)
            for c in range(len(LABELS))
            if (labels == c).any()
        },
    }


def domain_fid_floors(session: ort.InferenceSession, train: Split, test: Split, seed: int = 0) -> dict[str, float]:
    """The two reference FIDs in classifier-feature space: real train vs test, noisy test vs test."""
    rng = np.random.default_rng(seed)
    test_x = to_input(test.images)
    _, test_f = logits_and_features(session, test_x)
    idx = rng.choice(len(train), size=min(len(test), len(train)), replace=False)
    _, train_f = logits_and_features(session, to_input(train.images[idx]))
    noisy = np.clip(test_x + rng.normal(0, 0.3, test_x.shape).astype(np.float32), 0, 1)
    _, noisy_f = logits_and_features(session, noisy)
    return {
        "fid_train_vs_test": round(frechet_distance(train_f, test_f), 3),
        "fid_noisy_test_sigma0.3_vs_test": round(frechet_distance(noisy_f, test_f), 3),
    }


def generative_metrics(
    samples: np.ndarray, labels: np.ndarray, classifier: Path, train: Split, test: Split
) -> dict[str, Any]:
    """Class consistency and domain FID of generated samples, with the two FID floors beside them."""
    session = classifier_with_features(classifier)
    logits, features = logits_and_features(session, samples)
    _, test_features = logits_and_features(session, to_input(test.images))
    metrics = class_consistency(logits, labels)
    metrics["domain_fid"] = round(frechet_distance(features, test_features), 3)
    metrics.update(domain_fid_floors(session, train, test))
    metrics["samples"] = int(len(samples))
    return metrics


def diffusion_samples(
    model_dir: Path,
    labels: np.ndarray,
    method: str,
    steps: int,
    guidance: float,
    seed: int,
    spacing: str | None = None,
    batch: int = 500,
) -> np.ndarray:
    """Samples in [0,1] from the exported denoiser through the reference sampler, seeded as the model card's.

    Chunks of ``batch`` labels share one torch generator seeded with ``seed``, as
    ``training.train_diffusion.generate`` draws them, so every sampler starts from the same x_T
    as the card's DDIM-50 figures.
    """
    import torch

    from services.core.manifest import Manifest
    from training.diffusion import sampler
    from training.train_diffusion import OnnxDenoiser

    manifest = Manifest.read(model_dir / "manifest.json")
    alphas_cumprod = np.asarray(manifest.extra["alphas_cumprod"])
    denoiser = OnnxDenoiser(model_dir / manifest.file)
    g = torch.Generator().manual_seed(seed)
    null_class = int(manifest.extra["null_class"])
    out = []
    for s in range(0, len(labels), batch):
        y = torch.from_numpy(labels[s : s + batch])
        out.append(
            sampler.sample(
                denoiser, y, alphas_cumprod, steps, null_class, guidance, 0.0, g, method=method, spacing=spacing
            ).numpy()
        )
    return np.concatenate(out)


def sampler_quality(
    model_dir: Path,
    classifier: Path,
    method: str,
    steps: int,
    samples: int = 2000,
    seed: int | None = None,
    guidance: float | None = None,
    spacing: str | None = None,
    splits: tuple[Split, Split] | None = None,
) -> dict[str, Any]:
    """Class consistency and domain FID of ``samples`` images (``samples // 10`` per class) from one sampler.

    Seed and guidance default to those of the model card's evaluation.
    """
    from services.core.manifest import Manifest

    manifest = Manifest.read(model_dir / "manifest.json")
    seed = manifest.training.seed if seed is None and manifest.training else (seed or 0)
    guidance = float(manifest.metrics.get("guidance_scale", 2.0)) if guidance is None else guidance
    labels = np.repeat(np.arange(10), samples // 10).astype(np.int64)
    images = diffusion_samples(model_dir, labels, method, steps, guidance, seed, spacing)
    train, test = splits or (load_split("train"), load_split("test"))
    metrics = generative_metrics(images, labels, classifier, train, test)
    metrics.update(
        sampler=method,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        spacing=spacing or ("trailing" if method == "dpmpp2m" else "leading"),
    )
    return metrics


SAMPLER_CARD_HEADING = "## Few-step sampling"


def sampler_key(sampler: str, steps: int, guidance: float) -> str:
    """Where one sampler setting's figures live under the denoiser manifest's ``metrics.samplers``."""
    return f"{sampler}_{steps}_g{guidance:g}"


def record_sampler(model_dir: Path, metrics: dict[str, Any], make_default: bool = False) -> None:
    """Store one sampler's figures under ``metrics.samplers`` in the manifest and in the model card's
    few-step section, beside the card's DDIM-50 figures (the ONNX file is untouched).

    ``make_default``: also store its steps and guidance as that sampler's defaults in the service
    (``extra.sampler_defaults``), for requests that leave them unset.
    """
    from services.core.manifest import Manifest

    path = model_dir / "manifest.json"
    manifest = Manifest.read(path)
    keep = ("sampler", "steps", "spacing", "guidance_scale", "class_consistency", "domain_fid")
    entry = {k: metrics[k] for k in (*keep, "per_class_consistency", "samples", "seed", "command")}
    samplers = dict(manifest.metrics.get("samplers", {}))
    samplers[sampler_key(metrics["sampler"], metrics["steps"], metrics["guidance_scale"])] = entry
    manifest.metrics["samplers"] = samplers
    if make_default:
        defaults = dict(manifest.extra.get("sampler_defaults", {}))
        defaults[metrics["sampler"]] = {"steps": metrics["steps"], "guidance_scale": metrics["guidance_scale"]}
        manifest.extra["sampler_defaults"] = defaults
    manifest.write(path)
    m = manifest.metrics
    rows = [
        (
            "DDIM",
            m["steps"],
            "leading",
            m["guidance_scale"],
            f"{m['class_consistency']:.2%}",
            f"{m['domain_fid']:.2f}",
            "(the evaluation above)",
        )
    ]
    for _, r in sorted(samplers.items()):
        label = {"dpmpp2m": "DPM-Solver++(2M)"}.get(r["sampler"], r["sampler"].upper())
        cc, fid = f"{r['class_consistency']:.2%}", f"{r['domain_fid']:.2f}"
        rows.append((label, r["steps"], r["spacing"], r["guidance_scale"], cc, fid, f"`{r['command']}`"))
    from training.export import markdown_table

    header = ["sampler", "steps", "spacing", "guidance", "class consistency", "domain FID", "command"]
    defaults = manifest.extra.get("sampler_defaults", {})
    served = "".join(
        f"\nThe service's defaults for `{k}`: {v['steps']} steps, guidance {v['guidance_scale']}."
        for k, v in defaults.items()
    )
    section = f"""{SAMPLER_CARD_HEADING}

The same evaluation as above ({m["samples"]:,} samples, {m["samples"] // 10} per class, seed {entry["seed"]},
the same x_T draws, the shipped classifier, through onnxruntime) with the service's other samplers:

{markdown_table(header, rows)}
{served}
"""
    card_path = model_dir / "MODEL_CARD.md"
    card = card_path.read_text()
    if SAMPLER_CARD_HEADING in card:
        card = card[: card.index(SAMPLER_CARD_HEADING)]
    card_path.write_text(card.rstrip("\n") + "\n\n" + section)


def compare_outputs(reference: np.ndarray, other: np.ndarray, argmax: bool = False) -> dict[str, Any]:
    """How far ``other`` (say, an int8 model's output) is from ``reference`` (the fp32 model's)."""
    diff = np.abs(other.astype(np.float64) - reference)
    report: dict[str, Any] = {
        "max_abs_diff": float(f"{diff.max():.4g}"),
        "mean_abs_diff": float(f"{diff.mean():.4g}"),
        "rows": int(len(reference)),
    }
    if argmax:
        report["argmax_agreement"] = round(float((other.argmax(1) == reference.argmax(1)).mean()), 4)
    return report


def inference_ms(path: Path, inputs: dict[str, np.ndarray], seconds: float = 3.0, threads: int = 1) -> float:
    """Milliseconds per call of ``path`` on ``inputs`` in process: the median of five timed windows.

    The session is configured as the service configures its own (``threads`` intra-op threads,
    no spinning, all graph optimisations), so the figure is the model's share of a service call.
    """
    import time

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, inputs)
    windows = []
    for _ in range(5):
        calls, started = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - started < seconds / 5:
            session.run(None, inputs)
            calls += 1
        windows.append((time.perf_counter() - started) / calls * 1000)
    return float(np.median(windows))


def speed_comparison(
    fp32: Path, int8: Path, example: dict[str, np.ndarray], batches: Sequence[int], seconds: float = 3.0
) -> dict[str, dict[str, float]]:
    """fp32 and int8 milliseconds per call on one thread at each batch size, and the speed-up."""
    report = {}
    for batch in batches:
        feed = {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:]))) for k, v in example.items()}
        a, b = inference_ms(fp32, feed, seconds), inference_ms(int8, feed, seconds)
        report[str(batch)] = {"fp32_ms": round(a, 4), "int8_ms": round(b, 4), "speedup": round(a / b, 2)}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", choices=["classifier", "diffusion"])
    parser.add_argument("--model-dir", type=Path, default=None, help="default models/classifier/1 (or the denoiser's)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--precision", default="fp32", help="classifier: which variant of the version to score")
    parser.add_argument("--sampler", default="dpmpp2m", help="diffusion: ddim, ddpm or dpmpp2m")
    parser.add_argument("--steps", type=int, default=10, help="diffusion: sampling steps")
    parser.add_argument("--samples", type=int, default=2000, help="diffusion: images, a tenth per class")
    parser.add_argument("--spacing", default=None, help="diffusion: leading or trailing (default: the sampler's)")
    parser.add_argument("--seed", type=int, default=None, help="diffusion: default the model card's")
    parser.add_argument("--guidance", type=float, default=None, help="diffusion: default the model card's")
    parser.add_argument(
        "--record", action="store_true", help="diffusion: store the figures in the manifest and the model card"
    )
    parser.add_argument(
        "--make-default", action="store_true", help="diffusion: --record, and serve this sampler with these settings"
    )
    args = parser.parse_args(argv)
    if args.model == "diffusion":
        model_dir = args.model_dir or Path("models/diffusion_denoiser/1")
        metrics = sampler_quality(
            model_dir, Path("models/classifier/1"), args.sampler, args.steps, args.samples, args.seed,
            args.guidance, args.spacing,
        )  # fmt: skip
        metrics["command"] = shlex.join(
            ["python", "-m", "training.evaluate", *(sys.argv[1:] if argv is None else argv)]
        )
        print(json.dumps(metrics, indent=2))
        if args.record or args.make_default:
            record_sampler(model_dir, metrics, args.make_default)
        return 0
    args.model_dir = args.model_dir or Path("models/classifier/1")
    test = load_split("test", args.data_dir)
    if args.precision != "fp32":
        from services.core.manifest import Manifest
        from services.core.repository import manifest_file

        variant = Manifest.read(args.model_dir / manifest_file(args.precision))
        reference = classifier_logits(args.model_dir, test.images)
        logits = run_onnx(onnx_session(args.model_dir / variant.file), {"image": to_input(test.images)})[0]
        metrics = classifier_metrics(logits, test.labels)
        metrics.pop("confusion_matrix")
        metrics["fp32_accuracy"] = classifier_metrics(reference, test.labels)["accuracy"]
        metrics["parity_vs_fp32"] = compare_outputs(reference, logits, argmax=True)
        print(json.dumps(metrics, indent=2))
        return 0
    metrics = classifier_metrics(classifier_logits(args.model_dir, test.images), test.labels)
    metrics.pop("confusion_matrix")
    print(json.dumps(metrics, indent=2))
    return 0


def ood_benchmark(
    model_dir: Path, test: Split, images_per_set: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """AUROC and FPR at 95% TPR of a classifier graph's own ``ood_score`` output on every OOD benchmark set.

    The 10,000 test images are the in-distribution side; the sets come from ``training.ood.benchmark_sets``.
    """
    from training import ood

    session = onnx_session(model_dir / MODEL_FILE)
    inside = run_onnx(session, {"image": to_input(test.images)})[1]
    sets = ood.benchmark_sets(test.images, images_per_set, seed)
    return ood.ood_table(inside, {k: run_onnx(session, {"image": to_input(v)})[1] for k, v in sets.items()})


def robustness(model_dir: Path, test: Split, images: int = 2000, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """FGSM and PGD accuracies of a shipped classifier on the fixed test subset (``training.adversarial``)."""
    from training.adversarial import robustness_report, test_subset

    idx = test_subset(len(test), images, seed)
    return robustness_report(model_dir / MODEL_FILE, test.images[idx], test.labels[idx], seed=seed, **kwargs)


def save_robustness_plot(reports: dict[str, dict[str, Any]], path: Path) -> None:
    """Accuracy against eps under PGD-20 (solid) and FGSM (dashed), one colour per classifier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    for i, (name, r) in enumerate(reports.items()):
        colour = f"C{i}"
        pgd = sorted((float(k), v) for k, v in r["pgd20"].items())
        fgsm = sorted((float(k), v) for k, v in r["fgsm"].items())
        for points, style, label in ((pgd, "o-", "PGD-20"), (fgsm, "s--", "FGSM")):
            eps = [0.0] + [e for e, _ in points]
            accuracy = [r["clean"]] + [a for _, a in points]
            alpha = 1.0 if label == "PGD-20" else 0.6
            ax.plot(eps, accuracy, style, color=colour, alpha=alpha, label=f"{name}, {label}")
    ax.set_xlabel("eps (L-infinity, pixels in [0, 1])")
    ax.set_ylabel("accuracy (onnxruntime)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"White-box attacks, {next(iter(reports.values()))['images']:,} test images")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
