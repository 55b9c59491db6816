"""Train the class-conditional GAN, evaluate it, export the generator with manifest and model card.

python -m training.train_gan --epochs 12 --seed 0 --out models/gan_generator/1
python -m training.train_gan --dry-run
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from services.core.manifest import Preprocessing
from training.common import EMA, base_parser, finish_args, load_data, setup
from training.data import LABELS
from training.evaluate import generative_metrics, to_input
from training.export import (
    MODEL_FILE,
    OPSET,
    check_parity,
    export_onnx,
    markdown_table,
    onnx_session,
    run_onnx,
    tensor_specs,
    training_info,
    write_artifacts,
)
from training.models.gan import Discriminator, Generator
from training.plots import save_curves, save_grid

log = logging.getLogger("train_gan")


def parse_args(argv: Sequence[str] | None):  # type: ignore[no-untyped-def]
    p = base_parser(__doc__, epochs=12, lr=2e-4, batch_size=64)
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the auxiliary classifier loss")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--eval-samples", type=int, default=10_000)
    return finish_args(p.parse_args(argv), "gan_generator")


def fixed_grid_inputs(latent_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 samples per class, one class per row, with noise fixed for the whole run."""
    g = torch.Generator().manual_seed(seed + 1234)
    return torch.randn(100, latent_dim, generator=g), torch.arange(10).repeat_interleave(10)


def sample_inputs(n: int, latent_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n/10 samples per class with seeded noise: the evaluation set."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n // 10).astype(np.int64)
    return rng.standard_normal((len(labels), latent_dim)).astype(np.float32), labels


def train(args: Any, train_images: np.ndarray, train_labels: np.ndarray) -> tuple[Generator, list[dict[str, float]]]:
    g = torch.Generator().manual_seed(args.seed)
    gen, disc = Generator(args.latent_dim), Discriminator()
    ema = EMA(gen, args.ema_decay)
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2 * args.lr, betas=(0.0, 0.9))
    x_all, y_all = torch.from_numpy(to_input(train_images)), torch.from_numpy(train_labels)
    grid_z, grid_y = fixed_grid_inputs(args.latent_dim, args.seed)
    steps = len(x_all) // args.batch_size or 1
    history = []
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        sums = {"d_loss": 0.0, "g_loss": 0.0, "d_real_acc": 0.0}
        order = torch.randperm(len(x_all), generator=g)
        for step in range(steps):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            real, y = x_all[idx], y_all[idx]
            real = torch.where(torch.rand(len(real), 1, 1, 1, generator=g) < 0.5, real.flip(3), real)
            z = torch.randn(len(real), args.latent_dim, generator=g)
            fake_y = torch.randint(0, 10, (len(real),), generator=g)
            fake = gen(z, fake_y)
            # Discriminator: hinge loss, plus the auxiliary classifier on real images only.
            real_score, real_aux = disc(real, y)
            fake_score, _ = disc(fake.detach(), fake_y)
            d_loss = (
                F.relu(1 - real_score).mean()
                + F.relu(1 + fake_score).mean()
                + args.aux_weight * F.cross_entropy(real_aux, y)
            )
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            # Generator: fool the discriminator, and be classified as the class asked for.
            fake_score, fake_aux = disc(fake, fake_y)
            g_loss = -fake_score.mean() + args.aux_weight * F.cross_entropy(fake_aux, fake_y)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            ema.update(gen)
            sums["d_loss"] += float(d_loss.detach())
            sums["g_loss"] += float(g_loss.detach())
            sums["d_real_acc"] += float((real_aux.argmax(1) == y).float().mean())
            if (step + 1) % 200 == 0:
                log.info(
                    "epoch %d/%d  step %d/%d  d %.3f  g %.3f",
                    epoch,
                    args.epochs,
                    step + 1,
                    steps,
                    sums["d_loss"] / (step + 1),
                    sums["g_loss"] / (step + 1),
                )
        row = {"epoch": epoch, **{k: v / steps for k, v in sums.items()}, "seconds": time.perf_counter() - started}
        history.append(row)
        with torch.no_grad():
            save_grid(
                ema.model(grid_z, grid_y).numpy().reshape(10, 10, 28, 28), args.out / "samples_during_training.png"
            )
        log.info(
            "epoch %d/%d  d %.3f  g %.3f  aux acc %.3f  (%.0fs)",
            epoch,
            args.epochs,
            row["d_loss"],
            row["g_loss"],
            row["d_real_acc"],
            row["seconds"],
        )
    return ema.model, history


def model_card(fields: dict[str, Any]) -> str:
    m, t = fields["metrics"], fields["training"]
    per_class = markdown_table(
        ["class", "consistency"], [(k, f"{v:.1%}") for k, v in m.get("per_class_consistency", {}).items()]
    )
    return f"""# Model card: gan_generator, version {fields["version"]}

The generator of a class-conditional GAN trained on Fashion-MNIST. Served by the generate
service (`model: gan`). Noise is an input, so the graph is deterministic.

## Architecture
Generator: `z` (latent {fields["extra"]["latent_dim"]}) concatenated with a class embedding, a linear layer to
128x7x7, then two nearest-neighbour upsamplings with 3x3 convolutions (64, 32 channels), each
normalised by class-conditional batch norm, and a sigmoid output. **{fields["parameters"]:,} parameters.**
Discriminator (not exported): three spectrally normalised convolutions, a projection term for the
label (Miyato & Koyama 2018) and an auxiliary classifier head (AC-GAN, Odena et al. 2017), which
the issue's first experiment suggested for the upper-body classes.
Inputs `z` float32 [-1,{fields["extra"]["latent_dim"]}] and `label` int64 [-1], output `image` float32 [-1,1,28,28] in [0,1].
ONNX opset {fields["opset"]}; sha256 of `model.onnx`: `{{sha256}}`.

## Training
`{t["command"]}`, seed {t["seed"]}, {t["epochs"]} epochs over `{t["data"]}`, hinge loss plus the
auxiliary cross-entropy (weight {t["aux_weight"]}), Adam (lr {t["lr"]} for G, twice that for D,
betas 0.0/0.9), batch {t["batch_size"]}, horizontal flips, EMA of the generator weights (decay
{t["ema_decay"]}; the EMA generator is exported); {t["duration_s"]:.0f} s on {t["hardware"]}.

![losses](training_curves.png)

## Evaluation ({m.get("samples", 0):,} samples, {m.get("samples", 0) // 10:,} per class, seeded noise, through onnxruntime)
- **Class consistency {m.get("class_consistency", float("nan")):.2%}** (the shipped classifier labels the image as the requested class).
- **Domain FID {m.get("domain_fid", float("nan")):.2f}**, in the shipped classifier's penultimate-feature space against
  the 10k test set. Floors in the same space: 10k training images vs test
  {m.get("fid_train_vs_test", float("nan")):.2f}; test images with sigma-0.3 noise vs test
  {m.get("fid_noisy_test_sigma0.3_vs_test", float("nan")):.2f}.

{per_class}

![samples](sample_grid.png)

One class per row (T-shirt/top first, ankle boot last), fixed noise.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    train_split, test = load_data(args)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    gen, history = train(args, train_split.images, train_split.labels)
    duration = time.perf_counter() - started
    gen.eval()
    parameters = sum(p.numel() for p in gen.parameters())

    onnx_path = args.out / MODEL_FILE
    export_onnx(gen, {"z": torch.randn(2, args.latent_dim), "label": torch.tensor([0, 1])}, ["image"], onnx_path)
    z, labels = sample_inputs(100 if args.dry_run else args.eval_samples, args.latent_dim, args.seed)
    parity = check_parity(gen, onnx_path, {"z": z[:256], "label": labels[:256]})
    log.info("parity: %s", parity)
    samples = run_onnx(onnx_session(onnx_path), {"z": z, "label": labels})[0]
    metrics: dict[str, Any] = {}
    if not args.dry_run:
        metrics = generative_metrics(samples, labels, args.classifier, train_split, test)
    metrics["parity"] = parity.as_dict()
    log.info("metrics: %s", {k: v for k, v in metrics.items() if not isinstance(v, dict)})
    grid_z, grid_y = fixed_grid_inputs(args.latent_dim, args.seed)
    grid = run_onnx(onnx_session(onnx_path), {"z": grid_z.numpy(), "label": grid_y.numpy()})[0]
    save_grid(grid.reshape(10, 10, 28, 28), args.out / "sample_grid.png")
    save_curves(history, ["d_loss", "g_loss"], args.out / "training_curves.png", "gan")
    inputs, outputs = tensor_specs(onnx_session(onnx_path), ranges={"label": (0, 9)})
    fields: dict[str, Any] = {
        "name": "gan_generator",
        "version": int(args.out.name) if args.out.name.isdigit() else 1,
        "task": "image-generation",
        "opset": OPSET,
        "inputs": inputs,
        "outputs": outputs,
        "preprocessing": Preprocessing(
            description="Output: grayscale 28x28 in [0,1], light object on dark background."
        ),
        "labels": list(LABELS),
        "parameters": parameters,
        "metrics": metrics,
        "training": training_info(
            argv,
            args.seed,
            train_split.source,
            args.epochs,
            duration,
            lr=args.lr,
            batch_size=args.batch_size,
            aux_weight=args.aux_weight,
            ema_decay=args.ema_decay,
            history=history,
        ),
        "extra": {"latent_dim": args.latent_dim, "noise": "standard normal", "num_classes": 10},
    }
    manifest = write_artifacts(args.out, fields, model_card({**fields, "training": fields["training"].model_dump()}))
    log.info("wrote %s (sha256 %s)", args.out, manifest.sha256)
    return 0 if parity.allclose else 1


if __name__ == "__main__":
    raise SystemExit(main())
