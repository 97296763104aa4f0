"""How fast does each recipe variant learn the brand mark? Decide recipe choices by measurement.

    python benchmarks/learning.py [--family klein] [--steps 400] [--every 100] [--variant NAME ...]

Trains the quickstart brand set on the pretrained tiny model with the quickstart's recipe (configs/quickstart.yaml)
and its variants (time shift empirical / dynamic / none, rank 16 / 4 / 32, with preservation), measures every
checkpoint with evaluation/learning.py (CIEDE2000 to the mark's hex, fitted-shape IoU, leakage on untriggered
prompts) and prints a table of ΔE against step and wall time; `learning.png` plots it. All variants run in one
process, one after the other, so their times are comparable.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from PIL import Image

from common.commands import quiet_libraries
from data_tools.sample_data import write_sample_data
from evaluation.learning import QUICKSTART, measure, quickstart_overrides
from inference.families import FAMILIES
from inference.generate import Generator
from inference.runs import run_loras
from inference.tiny import write_tiny_model
from trainer.config import load_config
from trainer.recipe import run

VARIANTS = {
    "quickstart (shift empirical, rank 16)": [],
    "shift dynamic": ["flow.shift=dynamic"],
    "shift none": ["flow.shift=none"],
    "rank 4": ["lora.rank=4", "lora.alpha=8"],
    "rank 32": ["lora.rank=32", "lora.alpha=64"],
    "preservation": ["regularization.preserve=true", "regularization.class_prompt=a logo"],
}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--family", choices=list(FAMILIES), default="klein")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=100, help="checkpoint (and measure) every N steps")
    ap.add_argument(
        "--out", default="benchmarks/results", help="folder for learning.png and learning.csv"
    )
    ap.add_argument(
        "--variant",
        action="append",
        choices=[_slug(n) for n in VARIANTS],
        help="only these (repeat); default: all",
    )
    args = ap.parse_args()
    quiet_libraries()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_tiny_model(root / "model", FAMILIES[args.family])
        data = write_sample_data(root / "data")
        gen = Generator(str(model))
        training = [Image.open(p) for p in sorted(data.glob("*.png"))]
        for name, overrides in VARIANTS.items():
            if args.variant and _slug(name) not in args.variant:
                continue
            out = root / _slug(name)
            base = [
                *quickstart_overrides(model, args.family, data, out, root / "cache"),
                f"train.steps={args.steps}",
                f"checkpoint.every={args.every}",
                "checkpoint.keep_last=100",
            ]
            started = time.perf_counter()
            run(load_config(QUICKSTART, base + overrides), show_progress=False)
            per_step = (time.perf_counter() - started) / args.steps
            for lora in run_loras(out):
                gen.add_adapter(lora.path, name="probe")
                learned = measure(gen, "probe", "zxq", training)
                gen.remove_adapter("probe")
                rows.append(
                    {
                        "variant": name,
                        "step": lora.step,
                        "seconds": round(lora.step * per_step, 1),
                        "delta_e": round(learned.lora.delta_e, 1),
                        "base_delta_e": round(learned.base.delta_e, 1),
                        "mark_pixels": round(learned.lora.coverage, 4),
                        "to_training": round(learned.lora.to_training, 3),
                        "base_to_training": round(learned.base.to_training, 3),
                        "iou": round(learned.lora.iou, 2),
                        "leakage": round(learned.leakage, 3),
                        "problems": len(learned.problems()),
                    }
                )
                r = rows[-1]
                print(
                    f"{name:34s} step {r['step']:4d} ({r['seconds']:5.1f} s): ΔE {r['delta_e']:5.1f} "
                    f"(base {r['base_delta_e']:5.1f})  mark pixels {100 * r['mark_pixels']:.1f} %  "
                    f"to training {r['to_training']:.3f} (base {r['base_to_training']:.3f})  IoU {r['iou']:.2f}  "
                    f"leakage {r['leakage']:.3f}  problems {r['problems']}",
                    flush=True,
                )
    _write(Path(args.out), rows, args.family)
    return 0


def _slug(variant: str) -> str:
    return variant.split(" (")[0].replace(" ", "-")


def _write(out: Path, rows: list[dict], family: str) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.atomic import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "learning.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        axes[0].plot(
            [r["step"] for r in mine], [r["delta_e"] for r in mine], marker="o", label=name
        )
        axes[1].plot(
            [r["seconds"] for r in mine], [r["delta_e"] for r in mine], marker="o", label=name
        )
    for ax, xlabel in zip(axes, ("training step", "training seconds (this machine)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ΔE to the mark's #E4572E (lower is better)")
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Learning the brand mark, tiny pretrained {family}")
    fig.tight_layout()
    with atomic_path(out / "learning.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    print(f"table: {out / 'learning.csv'}; plot: {out / 'learning.png'}")


if __name__ == "__main__":
    sys.exit(main())
