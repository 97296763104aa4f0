"""Start-up of the everyday commands, against the floor of importing what they must import, in one run.

    python benchmarks/startup.py [--repeats 3]

Prints the median wall time of: `python -c pass`; `flux2-lora --help` and `sample-data` (they need neither torch
nor diffusers); importing torch + diffusers + transformers + accelerate + peft (what training cannot avoid);
and a 1-step tiny training run on a warm cache (its start-up: imports, checks, loading, one step, saving).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


def timed(argv: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start, proc.stdout + proc.stderr


def median(argv: list[str], cwd: Path, repeats: int) -> tuple[float, str]:
    runs = [timed(argv, cwd) for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    py, hub = sys.executable, [sys.executable, "-m", "flux2_lora"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        timed([*hub, "tiny-model", "model", "--family", "klein"], work)
        timed([*hub, "sample-data", "data"], work)
        (work / "c.yaml").write_text(
            "model: {path: model}\ndata: {path: data, trigger: zxq}\n"
            "train: {steps: 1, resolution: 64}\noutput: {dir: run, overwrite: true}\n"
            "cache: {dir: cache}\n"
        )
        train = [*hub, "train", "--config", "c.yaml", "--no-progress"]
        timed(train, work)  # fills the cache
        rows = [
            ("python -c pass", median([py, "-c", "pass"], work, args.repeats)[0]),
            ("flux2-lora --help", median([*hub, "--help"], work, args.repeats)[0]),
            ("flux2-lora sample-data", median([*hub, "sample-data", "d2"], work, args.repeats)[0]),
            (
                "import torch+diffusers+transformers+accelerate+peft",
                median(
                    [
                        py,
                        "-c",
                        "import torch, diffusers, transformers, accelerate, peft; "
                        "from diffusers import Flux2KleinPipeline",
                    ],
                    work,
                    args.repeats,
                )[0],
            ),
        ]
        total, said = median(train, work, args.repeats)
        ready = float(re.search(r"ready to train in ([\d.]+) s", said).group(1))
        rows.append(("flux2-lora train, 1 step (warm cache)", total))
        floor = rows[3][1]
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:6.2f} s")
    print(
        f"\ntrain: {total:.2f} s for a 1-step run (of which setup after imports {ready:.2f} s) = {total / floor:.2f}x "
        f"the {floor:.2f} s import floor"
    )


if __name__ == "__main__":
    main()
