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
    """float32 [N,1,28,28] in [0,1] -> (logits, penultimate features).

    The features are the last output (:func:`classifier_with_features` appends them), after any
    the graph has of its own (classifier v2's ``ood_score``).
    """
    outputs = run_onnx(session, {"image": images.astype(np.float32)})
    logits, features = outputs[0], outputs[-1]
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


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [len(a), len(b)] between two feature sets, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(sq, 0.0, None))


def knn_radii(features: np.ndarray, k: int = 5, chunk: int = 2000) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {len(features)}")
    out = np.empty(len(features))
    for s in range(0, len(features), chunk):
        d = pairwise_distances(features[s : s + chunk], features)
        # Column 0 of the sorted row is the point itself (distance 0), so the k-th neighbour is at index k.
        out[s : s + chunk] = np.partition(d, k, axis=1)[:, k]
    return out


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5, chunk: int = 2000) -> dict[str, float]:
    """Precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020).

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour. Precision: share of fake points inside the real manifold. Recall: share of real
    points inside the fake manifold. Density: how many real balls hold a fake point, on average,
    divided by k (1 for matching distributions, above 1 where fakes crowd dense regions).
    Coverage: share of real points whose ball holds at least one fake point. Both sets should
    have the same size, since the radii shrink as a set grows.
    """
    real_r, fake_r = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)
    in_real_balls = np.zeros(len(fake))  # per fake point: how many real balls contain it
    real_covered = np.zeros(len(real), dtype=bool)
    real_recalled = np.zeros(len(real), dtype=bool)
    for s in range(0, len(real), chunk):
        d = pairwise_distances(real[s : s + chunk], fake)  # [real chunk, fake]
        inside = d < real_r[s : s + chunk, None]
        in_real_balls += inside.sum(0)
        real_covered[s : s + chunk] = d.min(1) < real_r[s : s + chunk]
        real_recalled[s : s + chunk] = (d < fake_r[None, :]).any(1)
    return {
        "precision": float((in_real_balls > 0).mean()),
        "recall": float(real_recalled.mean()),
        "density": float(in_real_balls.mean() / k),
        "coverage": float(real_covered.mean()),
    }


def mean_pairwise_distance(features: np.ndarray, chunk: int = 2000) -> float:
    """Mean Euclidean distance over all pairs of distinct points: the spread of a set."""
    n = len(features)
    if n < 2:
        raise ValueError("the spread of a set needs at least two points")
    total = 0.0
    for s in range(0, n, chunk):
        total += pairwise_distances(features[s : s + chunk], features).sum()
    return float(total / (n * (n - 1)))


def diversity_metrics(
    features: np.ndarray, labels: np.ndarray, ref_features: np.ndarray, ref_labels: np.ndarray, k: int = 5
) -> dict[str, Any]:
    """Precision, recall, density, coverage (k-NN) and within-class diversity of one set against a reference.

    ``overall``: the four over all classes pooled; ``per_class``: the four within each class, plus
    ``diversity``, the mean pairwise feature distance within the class. ``within_class_diversity``
    is the mean of the per-class diversities; compare it with the same figure of held-out real
    images, since the scale is the feature space's.
    """
    overall = prdc(ref_features, features, k)
    per_class: dict[str, dict[str, float]] = {}
    for c in range(len(LABELS)):
        f, r = features[labels == c], ref_features[ref_labels == c]
        if len(f) <= k or len(r) <= k:
            continue
        row = prdc(r, f, k)
        row["diversity"] = mean_pairwise_distance(f)
        per_class[LABELS[c]] = {key: round(v, 4) for key, v in row.items()}
    diversity = float(np.mean([row["diversity"] for row in per_class.values()]))
    return {
        **{key: round(v, 4) for key, v in overall.items()},
        "within_class_diversity": round(diversity, 4),
        "per_class": per_class,
        "k": k,
        "samples": int(len(features)),
        "reference_samples": int(len(ref_features)),
    }


def reference_halves(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices splitting a labelled set into two halves with the same count per class (seeded).

    The first half is the reference set of :func:`diversity_metrics`; the second, scored against
    it, is the real-data row every model is compared with.
    """
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        first.append(idx[: len(idx) // 2])
        second.append(idx[len(idx) // 2 : 2 * (len(idx) // 2)])
    return np.concatenate(first), np.concatenate(second)


def per_class_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` items of every class, in order."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])


def diversity_table(
    session: ort.InferenceSession, test: Split, rows: dict[str, tuple[np.ndarray, np.ndarray]], k: int = 5
) -> dict[str, dict[str, Any]]:
    """:func:`diversity_metrics` for held-out real images and for each named set of samples.

    The test set is split into two class-balanced halves (:func:`reference_halves`): the first is
    the reference, the second the ``real`` row. Each entry of ``rows`` is (images [N,1,28,28] in
    [0,1], labels); it is cut to the real row's count per class, so every row has the same size
    (precision and recall depend on it).
    """
    ref_idx, real_idx = reference_halves(test.labels)
    _, ref_f = logits_and_features(session, to_input(test.images[ref_idx]))
    _, real_f = logits_and_features(session, to_input(test.images[real_idx]))
    ref_y, real_y = test.labels[ref_idx], test.labels[real_idx]
    table = {"real": diversity_metrics(real_f, real_y, ref_f, ref_y, k)}
    per_class = int(np.bincount(real_y).min())
    for name, (images, labels) in rows.items():
        keep = per_class_subset(labels, per_class)
        _, f = logits_and_features(session, images[keep])
        table[name] = diversity_metrics(f, labels[keep], ref_f, ref_y, k)
    return table


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


def sample_inputs(n: int, latent_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A GAN's evaluation inputs: n/10 samples per class with seeded noise (the model card's seed)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n // 10).astype(np.int64)
    return rng.standard_normal((len(labels), latent_dim)).astype(np.float32), labels


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


def generator_rows(
    gans: Sequence[Path],
    diffusion: Path | None,
    classifier: Path,
    per_class: int = 500,
    splits: tuple[Split, Split] | None = None,
    diffusion_sampler: tuple[str, int, float] = ("dpmpp2m", 10, 2.5),
) -> dict[str, dict[str, Any]]:
    """Diversity (:func:`diversity_table`), class consistency and domain FID of held-out real images,
    each GAN version and the diffusion model, all in ``classifier``'s feature space, through onnxruntime.

    Every generator draws ``per_class`` samples per class with its model card's seed (the GAN with
    :func:`sample_inputs`; the denoiser through the shipped sampler code).
    """
    from services.core.manifest import Manifest

    train, test = splits or (load_split("train"), load_split("test"))
    session = classifier_with_features(classifier)
    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for model_dir in gans:
        manifest = Manifest.read(model_dir / "manifest.json")
        seed = manifest.training.seed if manifest.training else 0
        z, labels = sample_inputs(10 * per_class, int(manifest.extra["latent_dim"]), seed)
        sets[f"{model_dir.parent.name}/{model_dir.name}"] = (
            run_onnx(onnx_session(model_dir / MODEL_FILE), {"z": z, "label": labels})[0],
            labels,
        )
    if diffusion is not None:
        manifest = Manifest.read(diffusion / "manifest.json")
        method, steps, guidance = diffusion_sampler
        labels = np.repeat(np.arange(10), per_class).astype(np.int64)
        seed = manifest.training.seed if manifest.training else 0
        images = diffusion_samples(diffusion, labels, method, steps, guidance, seed)
        sets[f"{diffusion.parent.name}/{diffusion.name} ({method}-{steps}, guidance {guidance:g})"] = (images, labels)
    table = diversity_table(session, test, sets)
    _, test_f = logits_and_features(session, to_input(test.images))
    ref_idx, real_idx = reference_halves(test.labels)
    real_logits, _ = logits_and_features(session, to_input(test.images[real_idx]))
    table["real"]["class_consistency"] = class_consistency(real_logits, test.labels[real_idx])["class_consistency"]
    table["real"]["note"] = "second half of the test set against the first (class-balanced, seed 0)"
    for name, (images, labels) in sets.items():
        logits, features = logits_and_features(session, images)
        table[name]["class_consistency"] = class_consistency(logits, labels)["class_consistency"]
        table[name]["domain_fid_vs_test"] = round(frechet_distance(features, test_f), 3)
        table[name]["fid_samples"] = int(len(images))
    return table


def rows_markdown(table: dict[str, dict[str, Any]]) -> str:
    """The overall figures of :func:`generator_rows`, one row per set, with each figure's ratio to real data's."""
    from training.export import markdown_table

    real = table["real"]
    real_diversity = real["within_class_diversity"]
    rows = []
    for name, r in table.items():
        fid = f"{r['domain_fid_vs_test']:.2f}" if "domain_fid_vs_test" in r else "-"
        rows.append(
            (
                name,
                f"{r['precision']:.3f}",
                f"{r['recall']:.3f} ({r['recall'] / real['recall']:.2f}x)",
                f"{r['density']:.3f}",
                f"{r['coverage']:.3f}",
                f"{r['within_class_diversity']:.3f} ({r['within_class_diversity'] / real_diversity:.2f}x)",
                f"{r['class_consistency']:.2%}",
                fid,
            )
        )
    header = ["set", "precision", "recall (x real)", "density", "coverage", "within-class diversity (x real)",
              "class consistency", "domain FID"]  # fmt: skip
    return markdown_table(header, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", choices=["classifier", "diffusion", "generators"])
    parser.add_argument("--gan", type=Path, action="append", default=[], help="generators: a GAN version (repeatable)")
    parser.add_argument("--diffusion", type=Path, default=None, help="generators: the denoiser version to add")
    parser.add_argument("--per-class", type=int, default=500, help="generators: samples per class")
    parser.add_argument("--classifier", type=Path, default=Path("models/classifier/2"), help="generators: features")
    parser.add_argument("--json-out", type=Path, default=None, help="generators: also write the figures here")
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
    if args.model == "generators":
        table = generator_rows(
            args.gan, args.diffusion, args.classifier, args.per_class,
            (load_split("train", args.data_dir), load_split("test", args.data_dir)),
            (args.sampler, args.steps, args.guidance if args.guidance is not None else 2.5),
        )  # fmt: skip
        command = shlex.join(["python", "-m", "training.evaluate", *(sys.argv[1:] if argv is None else argv)])
        for row in table.values():
            row["command"] = command
        if args.json_out:
            args.json_out.write_text(json.dumps(table, indent=2) + "\n")
        print(rows_markdown(table))
        return 0
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
