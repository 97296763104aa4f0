"""Compare two or more LoRA files (e.g. a character and a style LoRA) on one suite from Python.

    python scripts/compare_adapters.py --model runs/tiny-klein --out runs/compare runs/brand runs/style

Each LoRA (a file, or a run folder) is named by its run folder and prompted with its own trigger word.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.evaluate import adapters_from_files, evaluate
from evaluation.suites import load_suite

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--model", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--suite", default="style")
parser.add_argument("loras", nargs="+", help="LoRA files or run folders")
args = parser.parse_args()

result = evaluate(
    args.model,
    adapters_from_files(args.loras),
    load_suite(args.suite),
    args.out,
    scales=(0.0, 1.0),
    seeds=2,
    steps=8,
    width=64,
    height=64,
)
for column in result["columns"]:
    leak = column["metrics"]["leakage"]
    print(f"{column['column']:24s} leakage {'-' if leak is None else f'{leak:.4f}'}")
print(f"report: {Path(args.out) / 'report.html'}")
