"""Regenerate the example pictures in docs/images/ through real services on the shipped models.

    .venv/bin/python scripts/readme_examples.py

Starts restore and generate on free ports, damages a few test images (noise, an occluding
rectangle), restores them, and generates a GAN grid and a diffusion grid with fixed seeds.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.client import GenerateClient, RestoreClient  # noqa: E402
from services.generate.grid import grid_png  # noqa: E402
from training.data import load_split  # noqa: E402

OUT = ROOT / "docs" / "images"


def start(module: str, tmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp / f"{module}.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", "0", "--metrics-port", "none", "--port-file", str(port_file), *extra],
        cwd=ROOT,
    )
    while not port_file.exists():
        if proc.poll() is not None:
            raise SystemExit(f"{module} failed to start")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{json.loads(port_file.read_text())['port']}"


def save_scaled(png: bytes, path: Path, scale: int = 3) -> None:
    image = Image.open(io.BytesIO(png))
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(path)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    test = load_split("test")
    rng = np.random.default_rng(0)
    clean = test.images[:8].astype(np.float32)[:, None] / 255
    noisy = np.clip(clean + rng.normal(0, 0.3, clean.shape).astype(np.float32), 0, 1)
    occluded, mask = clean.copy(), np.zeros_like(clean)
    for i in range(8):
        top, left = rng.integers(4, 14, size=2)
        occluded[i, :, top : top + 10, left : left + 10] = 1.0
        mask[i, :, top : top + 10, left : left + 10] = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            restore, restore_address = start("services.restore", Path(tmp))
            procs.append(restore)
            generate, generate_address = start("services.generate", Path(tmp), "--max-count", "80")
            procs.append(generate)
            with RestoreClient(restore_address) as client:
                denoised = client.restore(tensor=noisy, as_tensor=True)
                inpainted = client.restore(tensor=occluded, mask_tensor=mask, as_tensor=True)
            as_array = lambda r: np.frombuffer(r.tensor.data, dtype="<f4").reshape(r.tensor.shape)  # noqa: E731
            rows = [clean, noisy, as_array(denoised), occluded, as_array(inpainted)]
            save_scaled(grid_png(np.concatenate(rows), columns=8), OUT / "restore_example.png")
            scores = [round(r.anomaly_score, 4) for r in denoised.restorations]
            with GenerateClient(generate_address) as client:
                labels = [c for c in range(10) for _ in range(8)]
                gan = client.generate(model="gan", count=80, labels=labels, seed=1, output="tensor", timeout=600)
                diffusion = client.generate(
                    model="diffusion", count=80, labels=labels, seed=1, steps=50, output="tensor", timeout=1200
                )
            for name, reply in (("gan_example", gan), ("diffusion_example", diffusion)):
                images = np.frombuffer(reply.tensor.data, dtype="<f4").reshape(reply.tensor.shape)
                save_scaled(grid_png(images, columns=8), OUT / f"{name}.png")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)
    print(json.dumps({"noisy_anomaly_scores": scores}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
