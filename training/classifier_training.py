"""The classifier's training loop and its flags, shared by ``train_classifier`` and by the
autoencoder's auxiliary teacher (``train_autoencoder --teacher trained``), which trains a small
classifier with the same loop and the same defaults.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.adversarial import pgd
from training.common import EMA, base_parser, finish_args
from training.data import Split
from training.evaluate import to_input
from training.export import command_line
from training.models.classifier import Classifier

log = logging.getLogger("train_classifier")


def parse_args(argv: Sequence[str] | None, doc: str | None = None) -> argparse.Namespace:
    """The classifier's flags (``doc`` is the help text's description)."""
    p = base_parser(doc, epochs=15, lr=3e-3, batch_size=128, with_classifier=False)
    p.add_argument("--val-size", type=int, default=5000, help="held out of train for OOD calibration")
    p.add_argument("--name", default="classifier", help="model name in the manifest (classifier, classifier_robust)")
    p.add_argument("--init-from", type=Path, default=None, help="start from an exported classifier's weights (.onnx)")
    p.add_argument("--schedule", choices=["onecycle", "cosine"], default="onecycle")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="cosine: linear warm-up length")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.05)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--erasing", type=float, default=0.0, help="random-erasing probability per image")
    p.add_argument("--ema", type=float, default=0.0, help="weight EMA decay (0: off); the EMA weights are exported")
    p.add_argument("--tta-flip", action="store_true", help="export the mean of the logits of x and its mirror")
    p.add_argument("--adv-eps", type=float, default=0.0, help="FGSM-with-random-start adversarial training (L-inf)")
    p.add_argument("--adv-alpha", type=float, default=None, help="FGSM step (default 1.25 eps; n-fgsm: eps)")
    p.add_argument(
        "--adv-method",
        choices=["fgsm-rs", "n-fgsm", "pgd"],
        default="fgsm-rs",
        help="fgsm-rs: uniform start in the eps-ball, projected (Wong et al. 2020); n-fgsm: noise of 2 eps, "
        "no projection (de Jorge et al. 2022), which resists catastrophic overfitting; pgd: --adv-steps "
        "projected steps from a random start (Madry et al. 2018), slower and stronger",
    )
    p.add_argument("--adv-steps", type=int, default=3, help="pgd: attack steps per batch (step 2.5 eps / steps)")
    p.add_argument(
        "--adv-clean-weight", type=float, default=0.0, help="weight of the clean images' loss beside the adversarial"
    )
    p.add_argument("--epoch-size", type=int, default=0, help="images drawn per epoch (0: the whole train split)")
    p.add_argument("--adv-ramp-epochs", type=float, default=0.0, help="grow eps linearly from 0 over this long")
    p.add_argument("--checkpoint", type=Path, default=None, help="torch weights written every epoch")
    p.add_argument("--resume-weights", type=Path, default=None, help="start from a --checkpoint file's weights")
    p.add_argument(
        "--finalize-from",
        type=Path,
        nargs="+",
        default=None,
        help="skip training: export a --checkpoint file, or the weighted average of several (--soup-weights)",
    )
    p.add_argument("--soup-weights", type=float, nargs="+", default=None, help="weights of the --finalize-from files")
    p.add_argument("--card-note", default="", help="a sentence for the model card's training section")
    p.add_argument("--robustness-images", type=int, default=2000, help="fixed test subset the attacks use")
    p.add_argument("--workers", type=int, default=1, help="attack worker processes (one thread each)")
    args = finish_args(p.parse_args(argv), "classifier", dry_epochs=2)
    args.argv = argv
    if args.dry_run:
        args.val_size = 64
    return args


def random_erasing(
    x: torch.Tensor, generator: torch.Generator, p: float, area: tuple[float, float] = (0.02, 0.25)
) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020): with probability ``p`` a rectangle of each image becomes noise."""
    n, _, h, w = x.shape
    frac = area[0] + (area[1] - area[0]) * torch.rand(n, generator=generator)
    aspect = torch.exp((torch.rand(n, generator=generator) - 0.5) * 2 * 1.2)  # log-uniform in [0.3, 3.3]
    eh = (torch.sqrt(frac * h * w * aspect)).round().clamp(1, h).long()
    ew = (torch.sqrt(frac * h * w / aspect)).round().clamp(1, w).long()
    top = (torch.rand(n, generator=generator) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=generator) * (w - ew + 1)).long()
    rows, cols = torch.arange(h)[None, :], torch.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = in_rows[:, :, None] & in_cols[:, None, :] & (torch.rand(n, generator=generator) < p)[:, None, None]
    return torch.where(mask[:, None], torch.rand(x.shape, generator=generator), x)


def fgsm_random_start(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, generator: torch.Generator
) -> torch.Tensor:
    """One FGSM step from a uniform random start in the eps-ball (Wong et al. 2020), clipped to [0, 1]."""
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    delta.requires_grad_(True)
    loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
    (grad,) = torch.autograd.grad(loss, delta)
    delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


def n_fgsm(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, generator: torch.Generator
) -> torch.Tensor:
    """N-FGSM (de Jorge et al. 2022): uniform noise of 2 eps plus one FGSM step, not projected back to eps."""
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * 2 * eps
    delta.requires_grad_(True)
    loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
    (grad,) = torch.autograd.grad(loss, delta)
    return (x + delta.detach() + alpha * grad.sign()).clamp(0, 1)


def pgd_k(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    generator: torch.Generator,
    steps: int = 3,
) -> torch.Tensor:
    """PGD adversarial training's examples (Madry et al. 2018): ``steps`` signed-gradient steps of
    ``alpha`` from a uniform random start, each projected onto the eps-ball and [0, 1]."""
    return pgd(model, x, y, eps, steps, step_size=alpha, generator=generator)


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


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: Split, batch_size: int = 1000) -> float:
    model.eval()
    x = torch.from_numpy(to_input(split.images))
    correct = 0
    for s in range(0, len(split), batch_size):
        correct += int((model(x[s : s + batch_size]).argmax(1).numpy() == split.labels[s : s + batch_size]).sum())
    return correct / len(split)


def pgd_accuracy(
    model: torch.nn.Module, split: Split, eps: float, steps: int, n: int, seed: int, batch_size: int = 250
) -> float:
    """PGD accuracy on the first ``n`` images of ``split``: the per-epoch robustness check."""
    from training.adversarial import pgd

    model.eval()
    x = torch.from_numpy(to_input(split.images[:n]))
    y = torch.from_numpy(split.labels[:n])
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    for s in range(0, len(x), batch_size):
        adv = pgd(model, x[s : s + batch_size], y[s : s + batch_size], eps, steps, generator=generator)
        with torch.no_grad():
            correct += int((model(adv).argmax(1) == y[s : s + batch_size]).sum())
    return correct / len(x)


def make_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, total: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if args.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total)
    warmup = int(args.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(model: Classifier, train_split: Split, val_split: Split, args: argparse.Namespace) -> list[dict[str, float]]:
    """Train with AdamW, a one-cycle or cosine schedule and label smoothing; returns per-epoch history.

    With ``--ema`` the EMA weights are copied into ``model`` at the end; with ``--adv-eps`` the
    model trains on FGSM-with-random-start examples and the weights with the best PGD-10
    accuracy on 500 validation images are kept (Wong et al.'s guard against catastrophic
    overfitting).
    """
    generator = torch.Generator().manual_seed(args.seed)
    x_all = torch.from_numpy(to_input(train_split.images))
    y_all = torch.from_numpy(train_split.labels)
    epoch_size = min(args.epoch_size or len(train_split), len(train_split))
    steps_per_epoch = (epoch_size + args.batch_size - 1) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args, total_steps, steps_per_epoch)
    ema = EMA(model, args.ema) if args.ema else None
    alpha = adv_alpha(args)
    attacks = {"n-fgsm": n_fgsm, "fgsm-rs": fgsm_random_start, "pgd": functools.partial(pgd_k, steps=args.adv_steps)}
    attack = attacks[args.adv_method]
    ramp = int(args.adv_ramp_epochs * steps_per_epoch)
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    global_step = 0
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(train_split), generator=generator)[:epoch_size]
        total_loss, correct, seen = 0.0, 0, 0
        for step, s in enumerate(range(0, epoch_size, args.batch_size), start=1):
            idx = order[s : s + args.batch_size]
            x, y = augment(x_all[idx], generator), y_all[idx]
            if args.erasing:
                x = random_erasing(x, generator, args.erasing)
            clean_x = x
            if args.adv_eps:
                scale = min(1.0, (global_step + 1) / ramp) if ramp else 1.0
                x = attack(model, x, y, args.adv_eps * scale, alpha * scale, generator)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            if args.adv_eps and args.adv_clean_weight:
                clean_loss = F.cross_entropy(model(clean_x), y, label_smoothing=args.label_smoothing)
                loss = args.adv_clean_weight * clean_loss + (1 - args.adv_clean_weight) * loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            global_step += 1
            if ema is not None:
                ema.update(model)
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            if step % 100 == 0:
                log.info(
                    "epoch %d/%d  step %d/%d  loss %.4f", epoch, args.epochs, step, steps_per_epoch, total_loss / seen
                )
        current = ema.model if ema is not None else model
        val_acc = accuracy(current, val_split)
        row = {
            "epoch": epoch,
            "train_loss": total_loss / seen,
            "train_accuracy": correct / seen,
            "val_accuracy": val_acc,
            "seconds": time.perf_counter() - started,
        }
        if args.adv_eps:
            row["val_pgd10_accuracy"] = pgd_accuracy(current, val_split, args.adv_eps, 10, 500, args.seed)
            log.info("epoch %d  val PGD-10 (eps %g) accuracy %.4f", epoch, args.adv_eps, row["val_pgd10_accuracy"])
            if best is None or row["val_pgd10_accuracy"] >= best[0]:
                best = (row["val_pgd10_accuracy"], copy.deepcopy(current.state_dict()))
        history.append(row)
        if args.checkpoint is not None:
            args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            state = best[1] if best is not None else current.state_dict()
            torch.save(
                {"model": state, "arch": arch_of(model), **provenance(history, args)},
                args.checkpoint,
            )
        log.info(
            "epoch %d/%d  loss %.4f  train acc %.4f  val acc %.4f  (%.0fs)",
            epoch,
            args.epochs,
            row["train_loss"],
            row["train_accuracy"],
            val_acc,
            row["seconds"],
        )
    final = best[1] if best is not None else (ema.model if ema is not None else model).state_dict()
    model.load_state_dict(final)
    return history


def provenance(history: list[dict[str, float]], args: argparse.Namespace) -> dict[str, Any]:
    """History and command of the whole run, earlier stages (``--resume-weights``) included."""
    prior = getattr(args, "prior", None) or {"history": [], "command": ""}
    offset = len(prior["history"])
    return {
        "history": prior["history"] + [{**h, "epoch": h["epoch"] + offset} for h in history],
        "command": " && ".join(c for c in (prior["command"], command_line(args.argv)) if c),
    }


def adv_alpha(args: argparse.Namespace) -> float:
    """The adversarial-training step: given, or the method's default."""
    if args.adv_alpha is not None:
        return float(args.adv_alpha)
    if args.adv_method == "pgd":
        return float(2.5 * args.adv_eps / args.adv_steps)
    return float(args.adv_eps if args.adv_method == "n-fgsm" else 1.25 * args.adv_eps)


def arch_of(model: Classifier) -> dict[str, Any]:
    """Constructor arguments that rebuild ``model`` from a checkpoint."""
    convs = [m for m in model.features if isinstance(m, torch.nn.Sequential)]
    return {
        "widths": (convs[0][0].out_channels, convs[2][0].out_channels),
        "hidden": model.head[2].out_features,
        "batch_norm": any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()),
    }
