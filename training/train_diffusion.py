"""Train the class-conditional diffusion denoiser, evaluate it, export it with manifest and model card.

    python -m training.train_diffusion --epochs 40 --max-minutes 90 --seed 0 --out models/diffusion_denoiser/1
    python -m training.train_diffusion --dry-run

Checkpoints go to ``--checkpoint`` every epoch; ``--resume`` continues from one, and
``--export-only`` evaluates and exports the checkpoint's EMA weights without training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.core.manifest import Preprocessing
from training.common import EMA, base_parser, finish_args, load_data, setup
from training.data import LABELS
from training.diffusion import sampler
from training.diffusion.schedule import cosine_alphas_cumprod, epsilon_loss, to_model_space
from training.evaluate import generative_metrics, to_input
from training.export import (
    MODEL_FILE,
    StagedVersion,
    check_parity,
    export_onnx,
    markdown_table,
    onnx_session,
    training_info,
    write_model,
)
from training.models.unet import UNet
from training.plots import save_curves, save_grid

log = logging.getLogger("train_diffusion")

NUM_TRAIN_STEPS = 1000
NULL_CLASS = 10


def parse_args(argv: Sequence[str] | None):  # type: ignore[no-untyped-def]
    p = base_parser(__doc__, epochs=40, lr=1e-3, batch_size=128)
    p.add_argument("--widths", type=int, nargs=3, default=[32, 64, 96])
    p.add_argument("--p-uncond", type=float, default=0.15, help="label dropout for classifier-free guidance")
    p.add_argument("--ema-decay", type=float, default=0.9995)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop training after this long (0: no limit)")
    p.add_argument("--guidance", type=float, default=2.0, help="guidance scale for evaluation and the manifest default")
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--checkpoint", type=Path, default=None, help="where to save/resume training state")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--export-only", action="store_true", help="skip training; export the checkpoint's EMA")
    args = finish_args(p.parse_args(argv), "diffusion_denoiser")
    if args.checkpoint is None:
        args.checkpoint = Path("runs/dry-run/diffusion.pt" if args.dry_run else "runs/diffusion/checkpoint.pt")
    return args


class OnnxDenoiser:
    """The exported denoiser behind the reference sampler's (x, t, label) -> eps interface."""

    def __init__(self, path: Path) -> None:
        self.session = onnx_session(path)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        feed = {
            "x_t": x.numpy().astype(np.float32),
            "t": t.numpy().astype(np.int64),
            "label": label.numpy().astype(np.int64),
        }
        return torch.from_numpy(self.session.run(None, feed)[0])


def generate(
    denoiser: Any,
    labels: np.ndarray,
    alphas_cumprod: np.ndarray,
    steps: int,
    guidance: float,
    seed: int,
    batch: int = 500,
) -> np.ndarray:
    """DDIM (eta 0) samples in [0,1] for ``labels``, in chunks, with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, len(labels), batch):
        y = torch.from_numpy(labels[s : s + batch])
        out.append(sampler.sample(denoiser, y, alphas_cumprod, steps, NULL_CLASS, guidance, 0.0, g).numpy())
        log.info("sampled %d/%d", min(s + batch, len(labels)), len(labels))
    return np.concatenate(out)


def train(
    args: Any,
    model: UNet,
    ema: EMA,
    images: np.ndarray,
    labels: np.ndarray,
    alphas_cumprod: np.ndarray,
    state: dict[str, Any],
) -> list[dict[str, float]]:
    g = torch.Generator().manual_seed(args.seed + state["epoch"])
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
    x_all, y_all = to_model_space(torch.from_numpy(to_input(images))), torch.from_numpy(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    steps = len(x_all) // args.batch_size or 1
    history: list[dict[str, float]] = state.get("history", [])
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else float("inf")
    grid_y = torch.arange(10).repeat_interleave(10)
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        model.train()
        started, total = time.perf_counter(), 0.0
        order = torch.randperm(len(x_all), generator=g)
        for step in range(steps):
            global_step = state["step"] = state["step"] + 1
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, global_step / 500)
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            x0 = x_all[idx]
            x0 = torch.where(torch.rand(len(x0), 1, 1, 1, generator=g) < 0.5, x0.flip(3), x0)
            loss = epsilon_loss(model, x0, y_all[idx], ac, NULL_CLASS, args.p_uncond, g)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ema.decay = min(args.ema_decay, (1 + global_step) / (10 + global_step))
            ema.update(model)
            total += float(loss.detach())
            if (step + 1) % 100 == 0:
                log.info("epoch %d/%d  step %d/%d  loss %.4f", epoch, args.epochs, step + 1, steps, total / (step + 1))
        history.append({"epoch": epoch, "train_loss": total / steps, "seconds": time.perf_counter() - started})
        state.update(
            epoch=epoch,
            history=history,
            optimizer=optimizer.state_dict(),
            model=model.state_dict(),
            ema=ema.model.state_dict(),
        )
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, args.checkpoint)
        grid = sampler.sample(
            ema.model, grid_y, alphas_cumprod, 20, NULL_CLASS, args.guidance, 0.0, torch.Generator().manual_seed(0)
        )
        # Beside the checkpoint, not in the version directory (see train_gan).
        save_grid(
            grid.numpy().reshape(10, 10, 28, 28), args.checkpoint.with_name(args.checkpoint.stem + ".samples.png")
        )
        log.info(
            "epoch %d/%d  loss %.4f  (%.0fs); checkpoint %s",
            epoch,
            args.epochs,
            total / steps,
            history[-1]["seconds"],
            args.checkpoint,
        )
        if time.monotonic() > deadline:
            log.info("time budget of %.0f minutes reached after epoch %d", args.max_minutes, epoch)
            break
    return history


def model_card(fields: dict[str, Any]) -> str:
    m, t, x = fields["metrics"], fields["training"], fields["extra"]
    per_class = markdown_table(
        ["class", "consistency"], [(k, f"{v:.1%}") for k, v in m.get("per_class_consistency", {}).items()]
    )
    sweep = markdown_table(
        ["guidance scale", "class consistency", "domain FID"],
        [
            (w, f"{r['class_consistency']:.2%}", f"{r['domain_fid']:.2f}")
            for w, r in m.get("guidance_sweep", {}).items()
        ],
    )
    return f"""# Model card: diffusion_denoiser, version {fields["version"]}

The denoiser of a class-conditional diffusion model trained on Fashion-MNIST. Served by the
generate service (`model: diffusion`), whose DDIM/DDPM loop runs in numpy over this graph; every
schedule parameter is in `manifest.json` under `extra`.

## Architecture
A U-Net at 28/14/7 pixels ({"/".join(map(str, x["widths"]))} channels): residual blocks with GroupNorm and SiLU,
self-attention at 7x7, skip connections. The sinusoidal timestep embedding (MLP) plus a class
embedding (10 classes and a null class, id {x["null_class"]}, for classifier-free guidance) scale and shift
every block (FiLM). **{fields["parameters"]:,} parameters.** Inputs `x_t` float32 [-1,1,28,28]
(data scaled to [-1,1]), `t` int64 [-1], `label` int64 [-1]; output `eps` float32 [-1,1,28,28]
(epsilon prediction). ONNX opset {fields["opset"]}; sha256 of `model.onnx`: `{{sha256}}`.

## Diffusion
T = {x["num_train_timesteps"]}, cosine schedule (Nichol & Dhariwal 2021), epsilon prediction. Sampling: DDIM (Song et
al. 2021) with eta, or DDPM (all T steps, eta = 1), and classifier-free guidance
`eps = eps_null + w (eps_label - eps_null)` (Ho & Salimans 2022); default w = {x["default_guidance_scale"]}.
The reference sampler is `training/diffusion/sampler.py`.

## Training
`{t["command"]}`, seed {t["seed"]}, {t["epochs"]} epochs over `{t["data"]}`, AdamW (lr {t["lr"]},
500 warm-up steps), batch {t["batch_size"]}, gradient clipping at 1, label dropout {t["p_uncond"]},
horizontal flips, EMA of the weights (decay {t["ema_decay"]}; the EMA weights are exported);
{t["duration_s"]:.0f} s on {t["hardware"]}.

![loss](training_curves.png)

## Evaluation (DDIM {m.get("steps", 0)} steps, eta 0, guidance {m.get("guidance_scale", 0)}, {m.get("samples", 0):,} samples, {m.get("samples", 0) // 10:,} per class, through onnxruntime)
- **Class consistency {m.get("class_consistency", float("nan")):.2%}** (the shipped classifier labels the image as the requested class).
- **Domain FID {m.get("domain_fid", float("nan")):.2f}** in the shipped classifier's penultimate-feature space against the
  10k test set. Floors in the same space: training images vs test {m.get("fid_train_vs_test", float("nan")):.2f};
  sigma-0.3 noisy test images vs test {m.get("fid_noisy_test_sigma0.3_vs_test", float("nan")):.2f}. The GAN,
  measured here with the same number of samples: {m.get("gan_domain_fid_same_samples", "n/a")}.

{per_class}

Guidance sweep (DDIM {m.get("steps", 0)}, {m.get("sweep_samples", 0)} samples each):

{sweep}

![samples](sample_grid.png)

One class per row (T-shirt/top first, ankle boot last), DDIM {m.get("steps", 0)} steps, guidance {m.get("guidance_scale", 0)}.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    train_split, test = load_data(args)
    alphas_cumprod = cosine_alphas_cumprod(NUM_TRAIN_STEPS)
    model = UNet(tuple(args.widths))
    ema = EMA(model, args.ema_decay)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "duration_s": 0.0}
    if args.resume or args.export_only:
        state = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        log.info("resumed from %s at epoch %d", args.checkpoint, state["epoch"])
    parameters = sum(p.numel() for p in model.parameters())
    log.info("UNet %s: %d parameters", args.widths, parameters)
    history = state["history"]
    if not args.export_only:
        started = time.perf_counter()
        history = train(args, model, ema, train_split.images, train_split.labels, alphas_cumprod, state)
        state["duration_s"] = state.get("duration_s", 0.0) + time.perf_counter() - started
        torch.save(state, args.checkpoint)
    denoiser = ema.model.eval()

    # Made at export, not when a run of hours starts, and out of sight until its manifest is
    # written: a version directory without one stops every service that reads the repository.
    staged = StagedVersion(args.out)
    args.out = staged.path
    onnx_path = args.out / MODEL_FILE
    example = {"x_t": torch.randn(2, 1, 28, 28), "t": torch.tensor([1, 500]), "label": torch.tensor([3, NULL_CLASS])}
    export_onnx(denoiser, example, ["eps"], onnx_path)
    rng = np.random.default_rng(args.seed)
    probe_t = np.repeat(np.array([1, NUM_TRAIN_STEPS // 2, NUM_TRAIN_STEPS - 1], np.int64), 16)
    probe = {
        "x_t": rng.standard_normal((len(probe_t), 1, 28, 28)).astype(np.float32),
        "t": probe_t,
        "label": rng.integers(0, NULL_CLASS + 1, len(probe_t)).astype(np.int64),
    }
    parity = check_parity(denoiser, onnx_path, probe)
    log.info("parity: %s", parity)

    onnx_denoiser = OnnxDenoiser(onnx_path)
    n = 20 if args.dry_run else args.eval_samples
    labels = np.repeat(np.arange(10), n // 10).astype(np.int64)
    steps = 5 if args.dry_run else args.eval_steps
    metrics: dict[str, Any] = {"steps": steps, "guidance_scale": args.guidance, "sampler": "ddim", "eta": 0.0}
    if not args.dry_run:
        sweep_n = max(10, n // 4)
        sweep_labels = np.repeat(np.arange(10), sweep_n // 10).astype(np.int64)
        metrics["sweep_samples"] = len(sweep_labels)
        metrics["guidance_sweep"] = {}
        for w in (1.0, 2.0, 3.0):
            s = generate(onnx_denoiser, sweep_labels, alphas_cumprod, steps, w, args.seed + 1)
            r = generative_metrics(s, sweep_labels, args.classifier, train_split, test)
            metrics["guidance_sweep"][str(w)] = {
                "class_consistency": r["class_consistency"],
                "domain_fid": r["domain_fid"],
            }
            log.info("guidance %.1f: %s", w, metrics["guidance_sweep"][str(w)])
    samples = generate(onnx_denoiser, labels, alphas_cumprod, steps, args.guidance, args.seed)
    if not args.dry_run:
        metrics.update(generative_metrics(samples, labels, args.classifier, train_split, test))
        gan = Path("models/gan_generator/1")
        if (gan / MODEL_FILE).exists():
            from training.evaluate import sample_inputs
            from training.export import run_onnx

            z, gl = sample_inputs(len(labels), int(_gan_latent(gan)), args.seed)
            gan_samples = run_onnx(onnx_session(gan / MODEL_FILE), {"z": z, "label": gl})[0]
            metrics["gan_domain_fid_same_samples"] = generative_metrics(
                gan_samples, gl, args.classifier, train_split, test
            )["domain_fid"]
    metrics["parity"] = parity.as_dict()
    log.info("metrics: %s", {k: v for k, v in metrics.items() if not isinstance(v, dict)})
    grid_labels = np.arange(10).repeat(10).astype(np.int64)
    grid = generate(onnx_denoiser, grid_labels, alphas_cumprod, steps, args.guidance, args.seed + 2)
    save_grid(grid.reshape(10, 10, 28, 28), args.out / "sample_grid.png")
    if history:
        save_curves(history, ["train_loss"], args.out / "training_curves.png", "diffusion")
    manifest = write_model(
        args.out,
        model_card,
        name="diffusion_denoiser",
        task="diffusion-denoiser",
        preprocessing=Preprocessing(
            description="x_t and samples live in [-1,1]; images are (x + 1) / 2 clipped to [0,1]."
        ),
        labels=LABELS,
        parameters=parameters,
        metrics=metrics,
        training=training_info(
            argv,
            args.seed,
            train_split.source,
            int(state["epoch"]),
            float(state["duration_s"]),
            lr=args.lr,
            batch_size=args.batch_size,
            p_uncond=args.p_uncond,
            ema_decay=args.ema_decay,
            history=history,
        ),
        extra={
            "num_train_timesteps": NUM_TRAIN_STEPS,
            "schedule": "cosine",
            "prediction_type": "epsilon",
            "alphas_cumprod": [float(a) for a in alphas_cumprod],
            "null_class": NULL_CLASS,
            "num_classes": 10,
            "default_guidance_scale": args.guidance,
            "clip_sample": True,
            "timestep_spacing": "leading",
            "data_range": [-1.0, 1.0],
            "widths": list(args.widths),
        },
        ranges={"t": (0, NUM_TRAIN_STEPS - 1), "label": (0, NULL_CLASS)},
    )
    args.out = staged.publish()
    log.info("wrote %s (sha256 %s)", args.out, manifest.sha256)
    return 0 if parity.allclose else 1


def _gan_latent(gan_dir: Path) -> int:
    from services.core.manifest import Manifest

    return int(Manifest.read(gan_dir / "manifest.json").extra["latent_dim"])


if __name__ == "__main__":
    raise SystemExit(main())
