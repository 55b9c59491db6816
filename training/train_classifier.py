"""Train the Fashion-MNIST CNN classifier, export it to ONNX and write its manifest and model card.

python -m training.train_classifier --epochs 15 --seed 0 --out models/classifier/1
python -m training.train_classifier --dry-run        # tiny fake data, seconds
"""

from __future__ import annotations

import argparse
import copy
import logging
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.core.manifest import OodCalibration, Preprocessing
from training import classifier_training
from training.classifier_training import adv_alpha, train
from training.common import load_data, setup
from training.data import LABELS, Split, split_train_val
from training.evaluate import classifier_metrics, to_input
from training.export import (
    MODEL_FILE,
    StagedVersion,
    check_parity,
    command_line,
    export_onnx,
    markdown_table,
    onnx_session,
    run_onnx,
    training_info,
    write_model,
)
from training.models.classifier import Classifier, ScoredClassifier, from_onnx, ood_features
from training.plots import save_curves

log = logging.getLogger("train_classifier")

PREPROCESSING = Preprocessing(
    description=(
        "Grayscale, fit into 28x28 keeping the aspect ratio, pixels scaled to [0, 1]; objects are "
        "light on a dark background as in Fashion-MNIST (light-background photos are inverted)."
    )
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """This script's flags: the classifier training loop's (:mod:`training.classifier_training`)."""
    return classifier_training.parse_args(argv, __doc__)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def model_card(fields: dict[str, Any], history: list[dict[str, float]]) -> str:
    m = fields["metrics"]
    t = fields["training"]
    ood = fields["ood"]
    robust = fields["name"] == "classifier_robust"
    per_class = markdown_table(["class", "accuracy"], [(k, f"{v:.2%}") for k, v in m["per_class_accuracy"].items()])
    header = ["epoch", "train loss", "train acc", "val acc"] + (["val PGD-10 acc"] if robust else []) + ["seconds"]
    curve = markdown_table(
        header,
        [
            (
                int(h["epoch"]),
                f"{h['train_loss']:.4f}",
                f"{h['train_accuracy']:.4f}",
                f"{h['val_accuracy']:.4f}",
                *([f"{h.get('val_pgd10_accuracy', float('nan')):.4f}"] if robust else []),
                f"{h['seconds']:.0f}",
            )
            for h in history
        ],
    )
    o = m["ood_benchmark"]
    scores = list(o["auroc_by_score"])
    ood_rows = markdown_table(
        ["input set", "kind", "AUROC", "FPR at 95% TPR", "flagged at the threshold", *[f"AUROC {k}" for k in scores]],
        [
            (
                name,
                "far" if name in o["far_ood"] else "near (reported only)",
                f"{row['auroc']:.4f}",
                f"{row['fpr95']:.2%}",
                f"{m['ood']['flagged'][name]:.1%}",
                *[f"{o['auroc_by_score'][k][name]:.4f}" for k in scores],
            )
            for name, row in o["shipped_score"].items()
        ],
    )
    r = m["robustness"]
    eps_rows = [("0 (clean)", _pct(r["clean"]), _pct(r["clean"]))]
    for eps in sorted({*r["fgsm"], *r["pgd20"]}, key=float):
        eps_rows.append((eps, _pct(r["fgsm"].get(eps)), _pct(r["pgd20"].get(eps))))
    rob_table = markdown_table(["eps (L-inf, [0,1] pixels)", "FGSM", "PGD-20"], eps_rows)
    sc = r.get("steps_check")
    steps_line = ""
    if sc:
        more = next(k for k in sc if k.startswith("pgd") and k != "pgd20")
        steps_line = (
            f"Attack sanity check at eps {sc['eps']} on the first {sc['images']} images of the subset: "
            f"PGD-20 {_pct(sc['pgd20'])}, {more.upper().replace('PGD', 'PGD-')} {_pct(sc[more])} "
            "(more steps must not raise accuracy; a rise would mean masked gradients)."
        )
    tta = m.get("tta_flip")
    tta_line = ""
    if tta:
        tta_line = (
            f"The graph averages the logits of the image and its mirror (flip test-time augmentation): "
            f"{tta['accuracy_without']:.2%} without it, {m['accuracy']:.2%} with it; onnxruntime latency on one "
            f"thread {tta['ms_without']['1']:.3f} -> {tta['ms_with']['1']:.3f} ms at batch 1 and "
            f"{tta['ms_without']['64']:.2f} -> {tta['ms_with']['64']:.2f} ms at batch 64 (the OOD score included in both)."
        )
    method = (
        "N-FGSM examples (de Jorge et al. 2022: uniform noise of 2 eps plus one signed-gradient step, not "
        "projected back onto the eps-ball)"
        if t.get("adv_method") == "n-fgsm"
        else f"PGD-{t.get('adv_steps')} examples (Madry et al. 2018: projected signed-gradient steps from a "
        "uniform random start in the eps-ball)"
        if t.get("adv_method") == "pgd"
        else "FGSM examples from a uniform random start in the eps-ball (Wong et al. 2020)"
    )
    mix = (
        f"; the loss weighs the clean batch {t['adv_clean_weight']} and the adversarial one {1 - t['adv_clean_weight']:.2g}"
        if t.get("adv_clean_weight")
        else ""
    )
    ramp = (
        f" (grown linearly from 0 over the first {t['adv_ramp_epochs']} epoch(s))" if t.get("adv_ramp_epochs") else ""
    )
    training_kind = (
        f"adversarial training: every batch is replaced by {method}, eps {t['adv_eps']}{ramp}, step "
        f"{t['adv_alpha']:.4g}{mix}; the EMA weights with the best PGD-10 accuracy on 500 validation images are kept"
        if robust
        else "standard training"
    )
    epoch_note = f" of {t['epoch_size']:,} images drawn from the training split" if t.get("epoch_size") else ""
    # The exported graph it started from, as "name vN" (models/<name>/<N>/model.onnx), else classifier v1.
    init = Path(t["init_from"]).parts if t.get("init_from") else ()
    source = f"{init[-3]} v{init[-2]}" if len(init) >= 3 and init[-2].isdigit() else "classifier v1"
    return f"""# Model card: {fields["name"]}, version {fields["version"]}

A small VGG-style CNN that labels 28x28 grayscale clothing images with one of the ten
Fashion-MNIST classes{", trained to resist L-infinity adversarial perturbations" if robust else ""}.
Served by `nnserve serve classify`.

## Architecture
Two stages of two 3x3 convolutions (32 then 64 channels, ReLU) each followed by 2x2 max pooling,
then dropout, a 128-unit hidden layer and 10 logits; input normalisation (mean 0.286, std 0.353)
is inside the graph. **{fields["parameters"]:,} parameters** (the weights of {source}, fine-tuned; batch norm
is folded into the convolutions, as in v1's exported graph).

- ONNX opset {fields["opset"]}, input `image` float32 [-1, 1, 28, 28] in [0, 1]; outputs `logits` float32 [-1, 10]
  and `ood_score` float32 [-1] (higher: less like the training data).
- sha256 of `model.onnx`: `{{sha256}}`

## Data
Fashion-MNIST (Xiao et al. 2017) from `{t["data"]}`: 60,000 training images, of which
{t["val_size"]:,} are held out for validation and OOD calibration, and the 10,000-image test set.
Augmentation: random horizontal flips and shifts of up to 2 pixels{", random erasing" if t.get("erasing") else ""}.

## Training
`{t["command"]}` (export and evaluation: `{t["finalize_command"]}`), seed {t["seed"]}, {t["epochs"]} epochs{epoch_note} from
{source}'s weights, {training_kind}. AdamW (weight decay {t["weight_decay"]}), cosine learning rate from {t["lr"]}
after a {t["warmup_epochs"]}-epoch warm-up, label smoothing {t["label_smoothing"]}, dropout {t["dropout"]}, weight EMA
{t["ema"]}, batch {t["batch_size"]}; {t["duration_s"]:.0f} s of training on {t["hardware"]}, one torch thread on a
2-core machine shared with other jobs (wall-clock time, mostly waiting for a core), torch {t["torch_version"]}.

{fields.get("card_note", "")}

{curve}

## Evaluation (10,000 test images, through onnxruntime)
**Test accuracy {m["accuracy"]:.2%}.** Parity with PyTorch on the whole test set: argmax agreement
{m["parity"]["argmax_agreement"]:.2%}, max |logit difference| {m["parity"]["max_abs_diff"]:.2e}
(rtol 1e-3 / atol 1e-5: {m["parity"]["allclose_rtol1e-3_atol1e-5"]}); `ood_score` max |difference|
{m["parity"]["ood_score_max_abs_diff"]:.2e}. {tta_line}

{per_class}

## Out-of-distribution score
`ood_score` = z(log Mahalanobis) + z(energy). The Mahalanobis part is the minimum over classes of the
squared distance, under one tied covariance (shrunk by 1e-3 towards its mean eigenvalue), of the
per-channel spatial mean and standard deviation of every convolution block plus the logits, to the
class means, fitted on {m["ood_benchmark"]["fit_images"]:,} training images; the energy part is
-logsumexp(logits) (Liu et al. 2020). Each part is standardised by its mean and standard deviation
on the {t["val_size"]:,} held-out validation images. The threshold **{ood["threshold"]:.4f}** is the 95th
percentile of the score on those images, so about 5% of in-distribution images are flagged by design
({m["ood"]["flagged"]["fashion_mnist_test"]:.1%} of the test set is).

The benchmark (`training/ood.py`, {o["images_per_set"]:,} images per set, seed {o["seed"]}, generated, nothing
downloaded) compares each set against the 10,000 test images; AUROC treats OOD as positive, and FPR
at 95% TPR is the share of test images flagged at the threshold that flags 95% of the set. The last
columns compare scores on the same images: max softmax, energy, Mahalanobis on the penultimate
(128-unit) layer alone (Lee et al. 2018), Mahalanobis on the multi-layer features alone, and the
shipped sum. **Far-OOD bar (AUROC >= 0.95 on every far set): {"met" if o["far_ood_bar_met"] else "NOT met"}**
(lowest {o["far_ood_min_auroc"]:.4f}).

{ood_rows}

## Adversarial robustness
White-box L-infinity attacks on a fixed subset of {r["images"]:,} test images (`training.adversarial.test_subset`,
seed {r["seed"]}), pixels in [0, 1]. FGSM is one signed-gradient step of size eps; PGD-20 takes 20 steps of
2.5 eps / 20 from a uniform random start, projecting onto the eps-ball and [0, 1], and keeps an
image's first misclassified iterate. Gradients come from a torch rendering of the exported graph
(`training.adversarial.OnnxModule`, max |logit difference| to onnxruntime {r["interpreter_max_abs_diff"]:.1e}); the
adversarial images are then scored by onnxruntime, so the figures are the served graph's{" (with its flip averaging)" if tta else ""}.

{rob_table}

{steps_line}

## Limits
Trained only on centred, light-on-dark 28x28 product photos; photos of clothing in other settings
are out of distribution, and the OOD flag is a heuristic rather than a guarantee: near-OOD inputs
(rotated or blurred clothing) are only partly caught. {"Robustness holds for L-infinity perturbations up to the trained eps of 0.1; larger or other perturbations (rotations, L2 patches) are not covered, and clean accuracy is lower than the standard classifier's." if robust else "Not adversarially robust: small crafted perturbations change its answer (see the table; serve classifier_robust where that matters)."}
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    full_train, test = load_data(args)
    train_split, val_split = split_train_val(full_train, args.val_size, args.seed)
    log.info("data: %d train, %d val, %d test from %s", len(train_split), len(val_split), len(test), full_train.source)

    if args.finalize_from is not None:
        checkpoints = [torch.load(path, weights_only=True) for path in args.finalize_from]
        checkpoint = checkpoints[0]
        weights = args.soup_weights or [1.0 / len(checkpoints)] * len(checkpoints)
        if len(weights) != len(checkpoints) or abs(sum(weights) - 1) > 1e-6:
            raise SystemExit("--soup-weights: one weight per --finalize-from file, summing to 1")
        model = Classifier(num_classes=len(LABELS), **checkpoint["arch"])
        # A weight-space average ("model soup") of runs fine-tuned from the same weights.
        model.load_state_dict(
            {k: sum(w * c["model"][k] for w, c in zip(weights, checkpoints, strict=True)) for k in checkpoint["model"]}
        )
        if len(checkpoints) > 1:
            checkpoint = {
                **checkpoint,
                "command": " && ".join(c["command"] for c in checkpoints),
            }
        history = checkpoint["history"]
        duration = sum(h["seconds"] for h in history)
    else:
        if args.resume_weights is not None:
            previous = torch.load(args.resume_weights, weights_only=True)
            model = Classifier(num_classes=len(LABELS), dropout=args.dropout, **previous["arch"])
            model.load_state_dict(previous["model"])
            args.prior = {"history": previous["history"], "command": previous["command"]}
        elif args.init_from is not None:
            model = from_onnx(args.init_from, dropout=args.dropout)
        else:
            model = Classifier(num_classes=len(LABELS), dropout=args.dropout)
        started = time.perf_counter()
        history = train(model, train_split, val_split, args)
        duration = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.parameters())
    model.eval()

    staged = StagedVersion(args.out)  # published whole at the end (see StagedVersion)
    args.out = staged.path
    metrics, ood = finalize(model, train_split, val_split, test, args)
    # Hyperparameters as the training run had them (a --finalize-from run only exports and measures).
    targv = shlex.split(checkpoint["command"].split(" && ")[-1])[3:] if args.finalize_from is not None else argv
    targs = parse_args(targv) if args.finalize_from is not None else args
    training = training_info(
        targv,
        targs.seed,
        full_train.source,
        len(history),
        duration,
        lr=targs.lr,
        batch_size=targs.batch_size,
        val_size=len(val_split),
        history=history,
        weight_decay=targs.weight_decay,
        warmup_epochs=targs.warmup_epochs,
        label_smoothing=targs.label_smoothing,
        dropout=targs.dropout,
        ema=targs.ema,
        erasing=targs.erasing,
        tta_flip=targs.tta_flip,
        adv_eps=targs.adv_eps,
        adv_alpha=adv_alpha(targs),
        adv_method=targs.adv_method,
        adv_steps=getattr(targs, "adv_steps", None),
        adv_clean_weight=targs.adv_clean_weight,
        epoch_size=targs.epoch_size,
        adv_ramp_epochs=targs.adv_ramp_epochs,
        init_from=str(targs.init_from) if targs.init_from else None,
        finalize_command=command_line(argv),
    )
    if args.finalize_from is not None:
        training.command = checkpoint["command"]  # every stage, joined by &&
    save_curves(history, ["train_accuracy", "val_accuracy"], args.out / "training_curves.png", args.name)
    manifest = write_model(
        args.out,
        lambda fields: model_card({**fields, "card_note": args.card_note}, history),
        name=args.name,
        task="image-classification",
        preprocessing=PREPROCESSING,
        labels=LABELS,
        parameters=parameters,
        ood=ood,
        metrics=metrics,
        training=training,
    )
    args.out = staged.publish()
    log.info("wrote %s (sha256 %s)", args.out, manifest.sha256)
    parity = metrics["parity"]
    ok = parity["allclose_rtol1e-3_atol1e-5"] and parity["argmax_agreement"] == 1.0
    if not ok:
        log.error("parity check failed: %s", parity)
    return 0 if ok else 1


class _Logits(torch.nn.Module):
    """First output only, for :func:`check_parity`."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


@torch.no_grad()
def torch_passes(
    model: Classifier, images: np.ndarray, scored: ScoredClassifier | None = None, batch_size: int = 1000
) -> dict[str, np.ndarray]:
    """Multi-layer and penultimate features, logits and (given ``scored``) raw OOD components, in torch."""
    x = torch.from_numpy(to_input(images))
    out: dict[str, list[np.ndarray]] = {"raw": [], "features": [], "hidden": [], "logits": []}
    for s in range(0, len(x), batch_size):
        xb = x[s : s + batch_size]
        logits, features = ood_features(model, xb)
        out["features"].append(features.numpy())
        if scored is not None:
            out["raw"].append(scored.components(xb)[1].numpy())
        out["hidden"].append(model.head[:5](model.features((xb - model.mean) / model.std)).numpy())
        out["logits"].append(logits.numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


def finalize(
    model: Classifier, train_split: Split, val_split: Split, test: Split, args: argparse.Namespace
) -> tuple[dict[str, Any], OodCalibration]:
    """Fit and calibrate the OOD score, export the scored graph, and measure everything through onnxruntime."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from training import ood
    from training.adversarial import robustness_report, test_subset

    model.eval()
    rng = np.random.default_rng(args.seed)
    fit_idx = rng.choice(len(train_split), size=min(10000, len(train_split)), replace=False)
    fit_images, fit_labels = train_split.images[fit_idx], train_split.labels[fit_idx]
    fit = torch_passes(model, fit_images)
    maha = ood.Mahalanobis.fit(fit["features"], fit_labels, len(LABELS))
    scored = ScoredClassifier(model, maha.means, maha.whiten, tta_flip=args.tta_flip).eval()
    scored.standardise(torch.from_numpy(to_input(val_split.images)))

    onnx_path = args.out / MODEL_FILE
    export_onnx(scored, {"image": torch.rand(2, 1, 28, 28)}, ["logits", "ood_score"], onnx_path)

    # The attacks are the slow part: they run in worker processes while the rest is measured here.
    n_rob = 64 if args.dry_run else args.robustness_images
    rob_idx = test_subset(len(test), n_rob, args.seed)
    pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
    rob_future = pool.submit(
        robustness_report,
        str(onnx_path),
        test.images[rob_idx],
        test.labels[rob_idx],
        steps_check=(0.1, 50, 16 if args.dry_run else 500),
        seed=args.seed,
        workers=args.workers,
        chunk=32 if args.dry_run else 250,
    )

    test_x = to_input(test.images)
    parity = check_parity(_Logits(scored), onnx_path, {"image": test_x}, argmax=True)
    session = onnx_session(onnx_path)
    test_logits, test_scores = run_onnx(session, {"image": test_x})
    with torch.no_grad():
        torch_scores = np.concatenate(
            [scored(torch.from_numpy(test_x[s : s + 1000]))[1].numpy() for s in range(0, len(test_x), 1000)]
        )
    metrics = classifier_metrics(test_logits, test.labels)
    metrics["parity"] = {**parity.as_dict(), "ood_score_max_abs_diff": float(np.abs(torch_scores - test_scores).max())}
    val_scores = run_onnx(session, {"image": to_input(val_split.images)})[1]
    threshold = float(np.quantile(val_scores, 0.95))

    n_ood = 32 if args.dry_run else 1000
    sets = ood.benchmark_sets(test.images, n_ood, args.seed)
    shipped = {name: run_onnx(session, {"image": to_input(images)}) for name, images in sets.items()}
    passes = {name: torch_passes(model, images, scored) for name, images in sets.items()}
    test_pass = torch_passes(model, test.images, scored)
    penultimate = ood.Mahalanobis.fit(fit["hidden"], fit_labels, len(LABELS))
    compare: dict[str, Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray]] = {
        "max_softmax": lambda logits, p: ood.max_softmax_score(logits),
        "energy": lambda logits, p: ood.energy_score(logits),
        "mahalanobis_penultimate": lambda logits, p: penultimate.score(p["hidden"]),
        "mahalanobis_multilayer": lambda logits, p: p["raw"][:, 0],
        "shipped": lambda logits, p: (p["raw"] - scored.location.numpy()) / scored.scale.numpy() @ np.ones(2),
    }
    auroc_by_score = {
        key: {name: ood.auroc(f(test_logits, test_pass), f(shipped[name][0], passes[name])) for name in sets}
        for key, f in compare.items()
    }
    auroc_by_score = {k: {n: round(v, 4) for n, v in d.items()} for k, d in auroc_by_score.items()}
    table = ood.ood_table(test_scores, {name: out[1] for name, out in shipped.items()})
    far_min = min(table[name]["auroc"] for name in ood.FAR_OOD)
    flagged = {"fashion_mnist_test": round(float((test_scores > threshold).mean()), 4)}
    flagged.update({name: round(float((out[1] > threshold).mean()), 4) for name, out in shipped.items()})
    metrics["ood"] = {"threshold": threshold, "flagged": flagged}
    metrics["ood_benchmark"] = {
        "images_per_set": n_ood,
        "seed": args.seed,
        "fit_images": int(len(fit_idx)),
        "far_ood": list(ood.FAR_OOD),
        "near_ood": list(ood.NEAR_OOD),
        "shipped_score": table,
        "auroc_by_score": auroc_by_score,
        "far_ood_min_auroc": far_min,
        "far_ood_bar_met": bool(far_min >= 0.95),
    }
    log.info("test accuracy (onnxruntime) %.4f; far-OOD min AUROC %.4f", metrics["accuracy"], far_min)
    if args.tta_flip:
        metrics["tta_flip"] = tta_comparison(scored, args.out, test, metrics["accuracy"], args.dry_run)
    metrics["robustness"] = rob_future.result()
    pool.shutdown()
    log.info("robustness %s", metrics["robustness"])

    return metrics, OodCalibration(
        score="mahalanobis_energy",
        threshold=threshold,
        calibration=(
            f"95th percentile of the graph's ood_score output on {len(val_split)} held-out training images; "
            "the score is z(log Mahalanobis) + z(energy), standardised on the same images"
        ),
    )


def tta_comparison(
    scored: ScoredClassifier, out_dir: Path, test: Split, accuracy_with: float, dry_run: bool
) -> dict[str, Any]:
    """Accuracy and single-thread latency of the same graph without the flip averaging."""
    import tempfile

    from training.evaluate import inference_ms

    plain = copy.deepcopy(scored)
    plain.tta_flip = False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        export_onnx(plain, {"image": torch.rand(2, 1, 28, 28)}, ["logits", "ood_score"], path)
        logits = run_onnx(onnx_session(path), {"image": to_input(test.images)})[0]
        seconds = 0.2 if dry_run else 3.0
        ms_without, ms_with = {}, {}
        for batch in (1, 64):
            feed = {"image": np.ascontiguousarray(to_input(np.resize(test.images, (batch, 28, 28))))}
            ms_without[str(batch)] = round(inference_ms(path, feed, seconds), 4)
            ms_with[str(batch)] = round(inference_ms(out_dir / MODEL_FILE, feed, seconds), 4)
    return {
        "accuracy_without": round(float((logits.argmax(1) == test.labels).mean()), 4),
        "accuracy_with": accuracy_with,
        "ms_without": ms_without,
        "ms_with": ms_with,
    }


if __name__ == "__main__":
    raise SystemExit(main())
