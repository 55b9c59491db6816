"""Train the class-conditional GAN, evaluate it, export the generator with manifest and model card.

python -m training.train_gan --epochs 12 --seed 0 --out models/gan_generator/2
python -m training.train_gan --dry-run

Version 1 used an AC-GAN auxiliary loss (``--aux-weight 1 --diffaug '' --mbstd-group 0``), which
collapsed each class onto a few pictures; the defaults are version 2's recipe.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from services.core.manifest import Preprocessing
from training.common import EMA, base_parser, finish_args, load_data, setup
from training.data import LABELS
from training.evaluate import classifier_with_features, diversity_table, generative_metrics, sample_inputs, to_input
from training.export import (
    MODEL_FILE,
    StagedVersion,
    check_parity,
    export_onnx,
    markdown_table,
    onnx_session,
    run_onnx,
    training_info,
    write_model,
)
from training.models.gan import Discriminator, Generator, diff_augment
from training.plots import save_curves, save_grid

log = logging.getLogger("train_gan")


def parse_args(argv: Sequence[str] | None):  # type: ignore[no-untyped-def]
    p = base_parser(__doc__, epochs=12, lr=2e-4, batch_size=64)
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument(
        "--aux-weight", type=float, default=0.1, help="weight of the AC-GAN auxiliary classifier loss (0: none)"
    )
    p.add_argument("--diffaug", default="translation", help="DiffAugment policy for D's inputs ('' for none)")
    p.add_argument("--mbstd-group", type=int, default=4, help="minibatch standard deviation group in D (0: off)")
    p.add_argument("--r1-gamma", type=float, default=0.1, help="R1 penalty weight on real images (0: off)")
    p.add_argument("--r1-every", type=int, default=16, help="lazy R1: apply it every this many steps")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--eval-samples", type=int, default=10_000)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (pilots; 0: no limit)")
    p.add_argument(
        "--max-train-seconds", type=float, default=0.0, help="stop training after this wall-clock time (0: no limit)"
    )
    p.add_argument("--mode-seeking", type=float, default=0.0, help="weight of the mode-seeking loss (0: off)")
    p.add_argument("--resume-from", type=Path, default=None, help="start from this checkpoint's weights")
    p.add_argument("--checkpoint", type=Path, default=None, help="save state here after every epoch")
    p.add_argument("--finalize-from", type=Path, default=None, help="skip training: export this checkpoint")
    p.add_argument(
        "--compare-with", type=Path, default=None, help="earlier version to score beside this one (model card history)"
    )
    p.add_argument(
        "--bn-recalibrate", type=int, default=0, help="batches to re-measure the EMA generator's BN statistics (0: off)"
    )
    p.add_argument("--extra-rows", type=Path, default=None, help="JSON of diversity rows to add (e.g. diffusion)")
    p.set_defaults(classifier=Path("models/classifier/2"))
    return finish_args(p.parse_args(argv), "gan_generator")


def fixed_grid_inputs(latent_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 samples per class, one class per row, with noise fixed for the whole run."""
    g = torch.Generator().manual_seed(seed + 1234)
    return torch.randn(100, latent_dim, generator=g), torch.arange(10).repeat_interleave(10)


def train(args: Any, train_images: np.ndarray, train_labels: np.ndarray) -> tuple[Generator, list[dict[str, float]]]:
    """Train; returns the EMA generator and one history row per epoch (a partial last one if a limit stopped it)."""
    g = torch.Generator().manual_seed(args.seed)
    gen, disc = Generator(args.latent_dim), Discriminator(mbstd_group=args.mbstd_group)
    ema = EMA(gen, args.ema_decay)
    history: list[dict[str, float]] = []
    if args.resume_from:
        # Weights only: the optimisers start afresh (Adam with beta1 0 forgets its moments within ~100 steps).
        state = torch.load(args.resume_from, map_location="cpu", weights_only=False)
        gen.load_state_dict(state["gen"])
        disc.load_state_dict(state["disc"])
        ema.model.load_state_dict(state["ema"])
        history = list(state["history"])
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2 * args.lr, betas=(0.0, 0.9))
    x_all, y_all = torch.from_numpy(to_input(train_images)), torch.from_numpy(train_labels)
    grid_z, grid_y = fixed_grid_inputs(args.latent_dim, args.seed)
    steps = len(x_all) // args.batch_size or 1
    aug = (lambda x: diff_augment(x, args.diffaug, g)) if args.diffaug else (lambda x: x)
    started_all = time.time()  # wall clock: a paused (SIGSTOP) run counts the pause against its limit
    total_steps = 0
    stop = False
    for epoch in range(len(history) + 1, args.epochs + 1):
        started = time.perf_counter()
        sums = {"d_loss": 0.0, "g_loss": 0.0, "r1": 0.0}
        order = torch.randperm(len(x_all), generator=g)
        done = 0
        for step in range(steps):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            real, y = x_all[idx], y_all[idx]
            real = torch.where(torch.rand(len(real), 1, 1, 1, generator=g) < 0.5, real.flip(3), real)
            z = torch.randn(len(real), args.latent_dim, generator=g)
            fake_y = torch.randint(0, 10, (len(real),), generator=g)
            if args.mode_seeking:
                fake_y[len(real) // 2 : 2 * (len(real) // 2)] = fake_y[: len(real) // 2]  # pairs: same label, other z
            fake = gen(z, fake_y)
            # Discriminator: hinge loss on augmented images (the same policy for real and fake).
            real_score, real_aux = disc(aug(real), y)
            fake_score, _ = disc(aug(fake.detach()), fake_y)
            d_loss = F.relu(1 - real_score).mean() + F.relu(1 + fake_score).mean()
            if args.aux_weight:
                d_loss = d_loss + args.aux_weight * F.cross_entropy(real_aux, y)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            if args.r1_gamma and total_steps % args.r1_every == 0:
                # Lazy R1 (Karras et al. 2020): the gradient penalty on real images, every r1_every
                # steps, scaled up by r1_every so its average weight is r1_gamma.
                real_r1 = real.detach().requires_grad_(True)
                score, _ = disc(real_r1, y)
                (grad,) = torch.autograd.grad(score.sum(), real_r1, create_graph=True)
                r1 = grad.pow(2).sum(dim=(1, 2, 3)).mean()
                (0.5 * args.r1_gamma * args.r1_every * r1).backward()
                sums["r1"] += float(r1.detach())
            opt_d.step()
            # Generator: fool the discriminator (and, with aux_weight, be classified as the class asked for).
            fake_score, fake_aux = disc(aug(fake), fake_y)
            g_loss = -fake_score.mean()
            if args.mode_seeking:
                # Mode seeking (Mao et al. 2019): two noises for one label should give images as far
                # apart as the noises are; the generator minimises the inverse of that ratio.
                h = len(real) // 2
                ratio = (fake[:h] - fake[h : 2 * h]).abs().mean() / (z[:h] - z[h : 2 * h]).abs().mean()
                g_loss = g_loss + args.mode_seeking / (ratio + 1e-5)
            if args.aux_weight:
                g_loss = g_loss + args.aux_weight * F.cross_entropy(fake_aux, fake_y)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            ema.update(gen)
            sums["d_loss"] += float(d_loss.detach())
            sums["g_loss"] += float(g_loss.detach())
            done, total_steps = step + 1, total_steps + 1
            if (step + 1) % 200 == 0:
                log.info(
                    "epoch %d/%d  step %d/%d  d %.3f  g %.3f  (%.2f s/step)",
                    epoch,
                    args.epochs,
                    step + 1,
                    steps,
                    sums["d_loss"] / (step + 1),
                    sums["g_loss"] / (step + 1),
                    (time.perf_counter() - started) / (step + 1),
                )
            if (args.max_steps and total_steps >= args.max_steps) or (
                args.max_train_seconds and time.time() - started_all >= args.max_train_seconds
            ):
                log.info("stopping at epoch %d step %d (%d steps in all): limit reached", epoch, done, total_steps)
                stop = True
                break
        row = {
            "epoch": epoch if done == steps else round(epoch - 1 + done / steps, 3),
            "d_loss": sums["d_loss"] / done,
            "g_loss": sums["g_loss"] / done,
            "seconds": time.perf_counter() - started,
            "steps": done,
        }
        if args.r1_gamma:
            row["r1"] = sums["r1"] / max(1, -(-done // args.r1_every))
        history.append(row)
        if args.checkpoint:
            # Progress beside the checkpoint, not in the version directory: a version directory
            # without its manifest would stop every service (and test) that reads the repository.
            with torch.no_grad():
                samples = ema.model(grid_z, grid_y).numpy().reshape(10, 10, 28, 28)
            save_grid(samples, args.checkpoint.with_name(args.checkpoint.stem + ".samples.png"))
            state = {"ema": ema.model.state_dict(), "gen": gen.state_dict(), "disc": disc.state_dict()}
            torch.save({**state, "history": history, "args": vars(args)}, args.checkpoint)
            torch.save(
                {**state, "history": history, "args": vars(args)}, args.checkpoint.with_suffix(f".epoch{epoch}.pt")
            )
        log.info(
            "epoch %s/%d  d %.3f  g %.3f  (%.0fs)",
            row["epoch"],
            args.epochs,
            row["d_loss"],
            row["g_loss"],
            row["seconds"],
        )
        if stop:
            break
    return ema.model, history


@torch.no_grad()
def recalibrate_batch_norm(gen: Generator, batches: int, seed: int, batch_size: int = 256) -> None:
    """Recompute the generator's batch-norm statistics with its own (EMA) weights.

    The EMA copies the live generator's running statistics, which were measured with other
    weights; a few forward passes in training mode with a cumulative average measure the ones
    the exported weights produce (random labels, as training draws them).
    """
    norms = [m for m in gen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    g = torch.Generator().manual_seed(seed + 99)
    gen.train()
    for _ in range(batches):
        gen(torch.randn(batch_size, gen.latent_dim, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
    gen.eval()
    for m in norms:
        m.momentum = 0.1


RECIPE = ("latent_dim", "epochs", "lr", "batch_size", "aux_weight", "diffaug", "mbstd_group", "r1_gamma", "r1_every",
          "ema_decay", "seed", "mode_seeking", "resume_from")  # fmt: skip


def load_checkpoint(path: Path, args: Any) -> tuple[Generator, list[dict[str, float]]]:
    """The EMA generator and the history saved by :func:`train` under ``--checkpoint``.

    The run's recipe (``RECIPE``) is copied onto ``args``, so the manifest records how the weights
    were trained rather than the finalizing command's defaults.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in RECIPE:
        if key in state["args"]:
            setattr(args, key, state["args"][key])
    gen = Generator(args.latent_dim)
    gen.load_state_dict(state["ema"])
    return gen.eval(), state["history"]


V1_AS_SHIPPED = {
    "class_consistency": 0.9763,
    "domain_fid": 26.435,
    "classifier": "models/classifier/1",
    "recipe": "AC-GAN auxiliary loss (weight 1.0), no DiffAugment, no minibatch std, 6 epochs, 3693 s on 1 CPU thread",
}


def _diversity_rows(m: dict[str, Any]) -> str:
    """The card's diversity table: held-out real images, this version, the version compared with, other models."""
    rows: dict[str, dict[str, Any]] = {"held-out real images (test half B vs half A)": m["diversity_real"]}
    rows["this version"] = {
        **m["diversity"],
        "class_consistency": m["class_consistency"],
        "domain_fid_vs_test": m["domain_fid"],
    }
    old = m.get("compared_with")
    if old:
        rows[f"{old['model']} (same evaluation)"] = {
            **old["diversity"],
            "class_consistency": old["class_consistency"],
            "domain_fid_vs_test": old["domain_fid"],
        }
    for name, row in m.get("diversity_other_models", {}).items():
        if name != "real" and not name.startswith("gan_generator/"):
            rows[name] = row
    real = m["diversity_real"]
    table = []
    for name, r in rows.items():
        fid = f"{r['domain_fid_vs_test']:.2f}" if "domain_fid_vs_test" in r else "-"
        cc = f"{r['class_consistency']:.2%}" if "class_consistency" in r else "-"
        table.append(
            (
                name,
                f"{r['precision']:.3f}",
                f"{r['recall']:.3f} ({r['recall'] / real['recall']:.2f}x)",
                f"{r['density']:.3f}",
                f"{r['coverage']:.3f}",
                f"{r['within_class_diversity']:.2f} ({r['within_class_diversity'] / real['within_class_diversity']:.2f}x)",
                cc,
                fid,
            )
        )
    header = ["set", "precision", "recall (x real)", "density", "coverage", "within-class diversity (x real)",
              "class consistency", "domain FID"]  # fmt: skip
    return markdown_table(header, table)


def _evaluation_section(m: dict[str, Any]) -> str:
    """The card's evaluation: class consistency, FID, the diversity rows and the per-class table."""
    d, real = m["diversity"], m["diversity_real"]
    per_class = markdown_table(
        ["class", "consistency", "precision", "recall", "coverage", "diversity", "real diversity"],
        [
            (
                k,
                f"{v:.1%}",
                f"{d['per_class'][k]['precision']:.3f}",
                f"{d['per_class'][k]['recall']:.3f}",
                f"{d['per_class'][k]['coverage']:.3f}",
                f"{d['per_class'][k]['diversity']:.2f}",
                f"{real['per_class'][k]['diversity']:.2f}",
            )
            for k, v in m["per_class_consistency"].items()
        ],
    )
    return f"""## Evaluation (through onnxruntime, seeded noise, features of `{m["classifier"]}`)
- **Class consistency {m["class_consistency"]:.2%}** over {m["samples"]:,} samples ({m["samples"] // 10:,} per class): the
  shipped classifier labels the image as the requested class.
- **Domain FID {m["domain_fid"]:.2f}** over the same samples, in the classifier's penultimate-feature space against
  the 10k test set. Floors in the same space: 10k training images vs test
  {m["fid_train_vs_test"]:.2f}; test images with sigma-0.3 noise vs test
  {m["fid_noisy_test_sigma0.3_vs_test"]:.2f}.
- **Diversity**: precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al.
  2020) with k = {d["k"]} nearest neighbours, and within-class diversity (mean pairwise feature
  distance within a class, averaged over classes). The test set is split into two class-balanced
  halves: half A ({real["reference_samples"]:,} images) is the reference, half B is the real-data row, and each
  generator is cut to the same {d["samples"]:,} samples ({d["samples"] // 10} per class) so every row has the same size.
  Per-class figures compare a class's samples with the same class of half A.

{_diversity_rows(m)}

{per_class}

![samples](sample_grid.png)

One class per row (T-shirt/top first, ankle boot last), fixed noise.
"""


def model_card(fields: dict[str, Any]) -> str:
    """The model card's text from the manifest's fields (metrics must hold the diversity rows)."""
    m, t = fields["metrics"], fields["training"]
    evaluation = _evaluation_section(m) if "diversity" in m else "## Evaluation\nNone (a dry run)."
    steps = t.get("steps", 0)
    epochs_done = t["history"][-1]["epoch"] if t.get("history") else t["epochs"]
    stopped = (
        f" The run's wall-clock limit stopped it after {epochs_done} of {t['epochs']} epochs ({steps:,} steps)."
        if epochs_done != t["epochs"]
        else f" {steps:,} steps."
    )
    old = m.get("compared_with")
    history = f"""## History
- **Version 1** (`models/gan_generator/1`, kept beside this one): {V1_AS_SHIPPED["recipe"]}. As
  shipped, in classifier v1's feature space: class consistency {V1_AS_SHIPPED["class_consistency"]:.2%},
  domain FID {V1_AS_SHIPPED["domain_fid"]:.2f}. Its samples were nearly one picture per class (mode
  collapse), which those two figures do not show."""
    if old:
        od = old["diversity"]
        history += f"""
  Scored again here with this card's evaluation (`{old["classifier"]}` features, the same seeded
  inputs): class consistency {old["class_consistency"]:.2%}, domain FID {old["domain_fid"]:.2f}, recall
  {od["recall"]:.3f}, within-class diversity {od["within_class_diversity"]:.2f}, precision {od["precision"]:.3f},
  coverage {od["coverage"]:.3f}."""
    recal = (
        f", its batch-norm statistics re-measured with its own weights over {t['bn_recalibrate_batches']} batches of 256"
        if t.get("bn_recalibrate_batches")
        else ""
    )
    aux = f"an AC-GAN auxiliary classifier loss of weight {t['aux_weight']}" if t["aux_weight"] else "no auxiliary loss"
    r1 = f"lazy R1 penalty (gamma {t['r1_gamma']}, every {t['r1_every']} steps)" if t["r1_gamma"] else "no R1 penalty"
    return f"""# Model card: gan_generator, version {fields["version"]}

The generator of a class-conditional GAN trained on Fashion-MNIST. Served by the generate
service (`model: gan`). Noise is an input, so the graph is deterministic.

## Architecture
Generator: `z` (latent {fields["extra"]["latent_dim"]}) concatenated with a class embedding, a linear layer to
128x7x7, then two nearest-neighbour upsamplings with 3x3 convolutions (64, 32 channels), each
normalised by class-conditional batch norm, and a sigmoid output. **{fields["parameters"]:,} parameters.**
Discriminator (not exported): three spectrally normalised convolutions, a minibatch
standard-deviation channel before the last one (group {t["mbstd_group"]}; Karras et al. 2018) and a
projection term for the label (Miyato & Koyama 2018).
Inputs `z` float32 [-1,{fields["extra"]["latent_dim"]}] and `label` int64 [-1], output `image` float32 [-1,1,28,28] in [0,1].
ONNX opset {fields["opset"]}; sha256 of `model.onnx`: `{{sha256}}`.

## Training
`{t["command"]}`, seed {t["seed"]}, over `{t["data"]}`: hinge loss, {aux},
DiffAugment `{t["diffaug"] or "none"}` on every discriminator input (Zhao et al. 2020), {r1},
Adam (lr {t["lr"]} for G, twice that for D, betas 0.0/0.9), batch {t["batch_size"]}, horizontal flips,
EMA of the generator weights (decay {t["ema_decay"]}; the EMA generator is exported{recal});
{t["duration_s"]:.0f} s on {t["hardware"]}, on a machine shared with other jobs.{stopped}

![losses](training_curves.png)

{evaluation}

{history}
"""


def score_generator(
    onnx_path: Path, args: Any, train_split: Any, test: Any, session: Any
) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    """(class consistency and FID metrics, diversity row, samples) of one exported generator on the seeded inputs."""
    z, labels = sample_inputs(100 if args.dry_run else args.eval_samples, args.latent_dim, args.seed)
    samples = run_onnx(onnx_session(onnx_path), {"z": z, "label": labels})[0]
    if args.dry_run:
        return {}, {}, samples
    metrics = generative_metrics(samples, labels, args.classifier, train_split, test)
    row = diversity_table(session, test, {"gan": (samples, labels)})
    return metrics, row, samples


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    train_split, test = load_data(args)
    started = time.perf_counter()
    if args.finalize_from:
        gen, history = load_checkpoint(args.finalize_from, args)
        duration = sum(row["seconds"] for row in history)
    else:
        gen, history = train(args, train_split.images, train_split.labels)
        duration = time.perf_counter() - started
    gen.eval()
    if args.bn_recalibrate:
        recalibrate_batch_norm(gen, args.bn_recalibrate, args.seed)
    parameters = sum(p.numel() for p in gen.parameters())

    # Made at export, not when a run of hours starts, and out of sight until its manifest is
    # written: a version directory without one stops every service that reads the repository.
    staged = StagedVersion(args.out)
    args.out = staged.path
    onnx_path = args.out / MODEL_FILE
    export_onnx(gen, {"z": torch.randn(2, args.latent_dim), "label": torch.tensor([0, 1])}, ["image"], onnx_path)
    z, labels = sample_inputs(256, args.latent_dim, args.seed)
    parity = check_parity(gen, onnx_path, {"z": z, "label": labels})
    log.info("parity: %s", parity)
    session = None if args.dry_run else classifier_with_features(args.classifier)
    metrics, table, _ = score_generator(onnx_path, args, train_split, test, session)
    if table:
        metrics["classifier"] = str(args.classifier)
        metrics["diversity"] = table["gan"]
        metrics["diversity_real"] = table["real"]
        log.info("diversity: %s", {k: v for k, v in table["gan"].items() if k != "per_class"})
        log.info("real: %s", {k: v for k, v in table["real"].items() if k != "per_class"})
    if args.compare_with and not args.dry_run:
        old, old_table, _ = score_generator(args.compare_with / MODEL_FILE, args, train_split, test, session)
        old.pop("per_class_consistency", None)
        old["diversity"] = {k: v for k, v in old_table["gan"].items() if k != "per_class"}
        metrics["compared_with"] = {"model": str(args.compare_with), "classifier": str(args.classifier), **old}
    if args.extra_rows:
        metrics["diversity_other_models"] = json.loads(args.extra_rows.read_text())
    metrics["parity"] = parity.as_dict()
    log.info("metrics: %s", {k: v for k, v in metrics.items() if not isinstance(v, dict)})
    grid_z, grid_y = fixed_grid_inputs(args.latent_dim, args.seed)
    grid = run_onnx(onnx_session(onnx_path), {"z": grid_z.numpy(), "label": grid_y.numpy()})[0]
    save_grid(grid.reshape(10, 10, 28, 28), args.out / "sample_grid.png")
    save_curves(history, ["d_loss", "g_loss"], args.out / "training_curves.png", "gan")
    manifest = write_model(
        args.out,
        model_card,
        name="gan_generator",
        task="image-generation",
        preprocessing=Preprocessing(description="Output: grayscale 28x28 in [0,1], light object on dark background."),
        labels=LABELS,
        parameters=parameters,
        metrics=metrics,
        training=training_info(
            argv,
            args.seed,
            train_split.source,
            args.epochs,
            duration,
            lr=args.lr,
            batch_size=args.batch_size,
            aux_weight=args.aux_weight,
            diffaug=args.diffaug,
            mbstd_group=args.mbstd_group,
            r1_gamma=args.r1_gamma,
            r1_every=args.r1_every,
            mode_seeking=args.mode_seeking,
            resumed_from=str(args.resume_from) if args.resume_from else None,
            ema_decay=args.ema_decay,
            bn_recalibrate_batches=args.bn_recalibrate,
            steps=sum(int(row["steps"]) for row in history),
            history=history,
        ),
        extra={"latent_dim": args.latent_dim, "noise": "standard normal", "num_classes": 10},
        ranges={"label": (0, 9)},
    )
    args.out = staged.publish()
    log.info("wrote %s (sha256 %s)", args.out, manifest.sha256)
    return 0 if parity.allclose else 1


if __name__ == "__main__":
    raise SystemExit(main())
