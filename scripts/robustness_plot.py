"""Draw docs/images/robustness_accuracy_vs_eps.png from the shipped classifiers' manifests.

Each manifest's ``metrics.robustness`` holds the accuracy on the fixed 2,000-image test subset
under FGSM and PGD-20 at each eps (training/adversarial.py computes it at export); this only plots
what the model cards already state, one line per classifier and attack.

    python scripts/robustness_plot.py [--models models] [--out docs/images/robustness_accuracy_vs_eps.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "robustness_accuracy_vs_eps.png")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for name in ("classifier", "classifier_robust"):
        versions = sorted((p for p in (args.models / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        for version in versions:
            report = json.loads((version / "manifest.json").read_text())["metrics"].get("robustness")
            if not report:
                continue
            label = f"{name}/{version.name}"
            for attack, style in (("pgd20", "-o"), ("fgsm", "--s")):
                points = sorted((float(eps), acc) for eps, acc in report[attack].items())
                xs = [0.0] + [eps for eps, _ in points]
                ys = [100 * report["clean"]] + [100 * acc for _, acc in points]
                ax.plot(xs, ys, style, label=f"{label} {'PGD-20' if attack == 'pgd20' else 'FGSM'}")
    ax.set_xlabel("eps (L-infinity, pixels in [0, 1])")
    ax.set_ylabel("accuracy on 2,000 test images (%)")
    ax.set_title("Accuracy under white-box L-infinity attacks")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
