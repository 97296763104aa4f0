"""Evaluate every checkpoint of a training run from Python and print the table and the recommendation.

    python scripts/evaluate_checkpoints.py --model runs/tiny-klein --run runs/quickstart --out runs/eval \
        [--suite product] [--references runs/sample-data] [--encoder path/to/dinov2]

The same as `flux2-lora evaluate`, written out so you can change what is rendered or measured.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.evaluate import adapters_from_run, evaluate
from evaluation.report import recommendation_text
from evaluation.suites import load_suite

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--model", required=True)
parser.add_argument("--run", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--suite", default="product")
parser.add_argument("--references")
parser.add_argument("--encoder")
parser.add_argument(
    "--size",
    type=int,
    default=64,
    help="render size (64 suits the tiny model; use 1024 on real ones)",
)
args = parser.parse_args()

suite = load_suite(args.suite)
# edits need reference images
suite.prompts = [p for p in suite.prompts if p.kind != "edit" or args.references]
result = evaluate(
    args.model,
    adapters_from_run(args.run),
    suite,
    args.out,
    scales=(0.0, 0.5, 1.0),
    seeds=2,
    references=args.references,
    encoder=args.encoder,
    steps=8,
    width=args.size,
    height=args.size,
)

print(f"{'column':18s} " + " ".join(f"{m:>20s}" for m in result["directions"]))
for column in result["columns"]:
    print(
        f"{column['column']:18s} "
        + " ".join(
            f"{'-' if v is None else f'{v:.4f}':>20s}"
            for v in (column["metrics"][m] for m in result["directions"])
        )
    )
rec = result["recommendation"]
print(f"\n{recommendation_text(rec)}")
print(f"report: {Path(args.out) / 'report.html'}")
