"""Train the Fashion-MNIST CNN classifier, export it to ONNX and write its manifest and model card.

python -m training.train_classifier --epochs 15 --seed 0 --out models/classifier/1
python -m training.train_classifier --dry-run        # tiny fake data, seconds
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from services.core.manifest import OodCalibration, Preprocessing
from training.common import base_parser, finish_args, load_data, setup
from training.data import LABELS, Split
from training.evaluate import calibrate_ood, classifier_logits, classifier_metrics, ood_report, to_input
from training.export import (
    MODEL_FILE,
    OPSET,
    check_parity,
    export_onnx,
    markdown_table,
    onnx_session,
    tensor_specs,
    training_info,
    write_artifacts,
)
from training.models.classifier import Classifier
from training.plots import save_curves

log = logging.getLogger("train_classifier")

PREPROCESSING = Preprocessing(
    description=(
        "Grayscale, fit into 28x28 keeping the aspect ratio, pixels scaled to [0, 1]; objects are "
        "light on a dark background as in Fashion-MNIST (light-background photos are inverted)."
    )
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__, epochs=15, lr=3e-3, batch_size=128, with_classifier=False)
    p.add_argument("--val-size", type=int, default=5000, help="held out of train for OOD calibration")
    args = finish_args(p.parse_args(argv), "classifier", dry_epochs=2)
    if args.dry_run:
        args.val_size = 64
    return args


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (zero padding)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=generator)
    dy = torch.randint(0, 5, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(28))[:, :, None]
    cols = (dx[:, None] + torch.arange(28))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


def split_train_val(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    order = np.random.default_rng(seed).permutation(len(train))
    val_idx, train_idx = order[:val_size], order[val_size:]
    return (
        Split(train.images[train_idx], train.labels[train_idx], train.source),
        Split(train.images[val_idx], train.labels[val_idx], train.source),
    )


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: Split, batch_size: int = 1000) -> float:
    model.eval()
    x = torch.from_numpy(to_input(split.images))
    correct = 0
    for s in range(0, len(split), batch_size):
        correct += int((model(x[s : s + batch_size]).argmax(1).numpy() == split.labels[s : s + batch_size]).sum())
    return correct / len(split)


def train(model: Classifier, train_split: Split, val_split: Split, args: argparse.Namespace) -> list[dict[str, float]]:
    """Train with AdamW, a one-cycle schedule and label smoothing; returns per-epoch history."""
    generator = torch.Generator().manual_seed(args.seed)
    x_all = torch.from_numpy(to_input(train_split.images))
    y_all = torch.from_numpy(train_split.labels)
    steps_per_epoch = (len(train_split) + args.batch_size - 1) // args.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch
    )
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(train_split), generator=generator)
        total_loss, correct, seen = 0.0, 0, 0
        for step, s in enumerate(range(0, len(train_split), args.batch_size), start=1):
            idx = order[s : s + args.batch_size]
            x, y = augment(x_all[idx], generator), y_all[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            if step % 100 == 0:
                log.info(
                    "epoch %d/%d  step %d/%d  loss %.4f", epoch, args.epochs, step, steps_per_epoch, total_loss / seen
                )
        val_acc = accuracy(model, val_split)
        row = {
            "epoch": epoch,
            "train_loss": total_loss / seen,
            "train_accuracy": correct / seen,
            "val_accuracy": val_acc,
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        log.info(
            "epoch %d/%d  loss %.4f  train acc %.4f  val acc %.4f  (%.0fs)",
            epoch,
            args.epochs,
            row["train_loss"],
            row["train_accuracy"],
            val_acc,
            row["seconds"],
        )
    return history


def model_card(fields: dict[str, Any], history: list[dict[str, float]]) -> str:
    m = fields["metrics"]
    t = fields["training"]
    ood = fields["ood"]
    per_class = markdown_table(["class", "accuracy"], [(k, f"{v:.2%}") for k, v in m["per_class_accuracy"].items()])
    curve = markdown_table(
        ["epoch", "train loss", "train acc", "val acc", "seconds"],
        [
            (
                int(h["epoch"]),
                f"{h['train_loss']:.4f}",
                f"{h['train_accuracy']:.4f}",
                f"{h['val_accuracy']:.4f}",
                f"{h['seconds']:.0f}",
            )
            for h in history
        ],
    )
    ood_rows = markdown_table(
        ["input set", "flagged as OOD"], [(k.removesuffix("_flagged"), f"{v:.1%}") for k, v in m["ood"].items()]
    )
    return f"""# Model card: classifier, version {fields["version"]}

A small VGG-style CNN that labels 28x28 grayscale clothing images with one of the ten
Fashion-MNIST classes. Served by `nnserve serve classify`.

## Architecture
Two stages of two 3x3 convolutions (32 then 64 channels, batch norm, ReLU) each followed by 2x2
max pooling, then dropout, a 128-unit hidden layer and 10 logits. Input normalisation
(mean 0.286, std 0.353) is inside the graph. **{fields["parameters"]:,} parameters.**

- ONNX opset {fields["opset"]}, input `image` float32 [-1, 1, 28, 28] in [0, 1], output `logits` float32 [-1, 10].
- sha256 of `model.onnx`: `{{sha256}}`

## Data
Fashion-MNIST (Xiao et al. 2017) from `{t["data"]}`: 60,000 training images, of which
{t["val_size"]:,} are held out for validation and OOD calibration, and the 10,000-image test set.
Augmentation: random horizontal flips and shifts of up to 2 pixels.

## Training
`{t["command"]}`, seed {t["seed"]}, {t["epochs"]} epochs, AdamW with a one-cycle learning-rate
schedule (peak {t["lr"]}), label smoothing 0.05, batch {t["batch_size"]}; {t["duration_s"]:.0f} s on {t["hardware"]},
torch {t["torch_version"]}.

{curve}

![training curves](training_curves.png)

## Evaluation (10,000 test images, through onnxruntime)
**Test accuracy {m["accuracy"]:.2%}.** Parity with PyTorch on the whole test set: argmax agreement
{m["parity"]["argmax_agreement"]:.2%}, max |logit difference| {m["parity"]["max_abs_diff"]:.2e}
(rtol 1e-3 / atol 1e-5: {m["parity"]["allclose_rtol1e-3_atol1e-5"]}).

{per_class}

## Out-of-distribution score
The score is the energy, `-logsumexp(logits)` (Liu et al., 2020); higher is less like the training
data. The threshold **{ood["threshold"]:.4f}** is the 95th percentile of the score on the held-out
validation images, so about 5% of in-distribution images are flagged by design.

{ood_rows}

## Limits
Trained only on centred, light-on-dark 28x28 product photos; photos of clothing in other settings
are out of distribution, and the OOD flag is a heuristic rather than a guarantee.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    full_train, test = load_data(args)
    train_split, val_split = split_train_val(full_train, args.val_size, args.seed)
    log.info("data: %d train, %d val, %d test from %s", len(train_split), len(val_split), len(test), full_train.source)

    model = Classifier(num_classes=len(LABELS))
    parameters = sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    history = train(model, train_split, val_split, args)
    duration = time.perf_counter() - started
    model.eval()

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / MODEL_FILE
    export_onnx(model, {"image": torch.rand(2, 1, 28, 28)}, ["logits"], onnx_path)
    parity = check_parity(model, onnx_path, {"image": to_input(test.images)}, argmax=True)
    log.info("parity: %s", parity)

    test_logits = classifier_logits(args.out, test.images)
    metrics = classifier_metrics(test_logits, test.labels)
    threshold = calibrate_ood(classifier_logits(args.out, val_split.images))
    metrics["ood"] = ood_report(args.out, threshold, test, args.seed)
    metrics["parity"] = parity.as_dict()
    log.info("test accuracy (onnxruntime) %.4f; OOD %s", metrics["accuracy"], metrics["ood"])
    save_curves(history, ["train_accuracy", "val_accuracy"], args.out / "training_curves.png", "classifier")

    inputs, outputs = tensor_specs(onnx_session(onnx_path))
    fields: dict[str, Any] = {
        "name": "classifier",
        "version": int(args.out.name) if args.out.name.isdigit() else 1,
        "task": "image-classification",
        "opset": OPSET,
        "inputs": inputs,
        "outputs": outputs,
        "preprocessing": PREPROCESSING,
        "labels": list(LABELS),
        "parameters": parameters,
        "ood": OodCalibration(
            score="energy",
            threshold=threshold,
            calibration=f"95th percentile of -logsumexp(logits) on {len(val_split)} held-out training images",
        ),
        "metrics": metrics,
        "training": training_info(
            argv,
            args.seed,
            full_train.source,
            args.epochs,
            duration,
            lr=args.lr,
            batch_size=args.batch_size,
            val_size=len(val_split),
            history=history,
        ),
    }
    card = model_card(
        {**fields, "ood": fields["ood"].model_dump(), "training": fields["training"].model_dump()}, history
    )
    manifest = write_artifacts(args.out, fields, card)
    log.info("wrote %s (sha256 %s)", args.out, manifest.sha256)
    ok = parity.allclose and parity.argmax_agreement == 1.0
    if not ok:
        log.error("parity check failed: %s", parity)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
