"""Dataset preparation throughput: synthetic 4000x3000 JPEGs prepared (--fix) to 1024 buckets.

    python benchmarks/prepare_images.py [--max 50]

Prints images/s and peak memory for --workers 1 and 2 on 50 images, and how time grows from 10 to 50 images
(roughly linear means images stream rather than pile up). Each measurement runs in its own process so peak
memory is that run's alone.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_images(folder: Path, count: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        w, h = (4000, 3000) if i % 3 else (3000, 4000)
        image = Image.linear_gradient("L").resize((w, h)).convert("RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(100, 900)
            draw.ellipse(
                (x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3))
            )
        image.save(folder / f"img_{i:03d}.jpg", quality=90)
        (folder / f"img_{i:03d}.txt").write_text(f"zxq, product photo {i}")


def one_run(src: str, count: int, workers: int) -> None:
    """Child mode: prepare the first `count` images and print seconds and peak RSS as JSON."""
    from data_tools.prepare import PrepareOptions, prepare

    source = Path(src)
    subset = Path(tempfile.mkdtemp()) / "subset"
    subset.mkdir()
    for p in sorted(source.glob("*.jpg"))[:count]:
        (subset / p.name).symlink_to(p)
        (subset / p.with_suffix(".txt").name).symlink_to(p.with_suffix(".txt"))
    start = time.perf_counter()
    prepare(
        subset,
        subset.parent / "out",
        PrepareOptions(trigger="zxq", resolution=1024, fix=True, workers=workers),
        show_progress=False,
    )
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "main_mb": own, "worker_mb": child}))


def measure(src: Path, count: int, workers: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(src), str(count), str(workers)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        one_run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        t = time.perf_counter()
        make_images(src, args.max)
        print(f"made {args.max} synthetic 4000x3000 JPEGs in {time.perf_counter() - t:.1f}s")
        rows = []
        for count, workers in [(10, 1), (args.max, 1), (args.max, 2)]:
            r = measure(src, count, workers)
            rows.append((count, workers, r))
            print(
                f"{count:3d} images, workers {workers}: {r['seconds']:6.1f}s  {count / r['seconds']:5.2f} images/s  "
                f"peak RSS main {r['main_mb']:.0f} MB"
                + (f", largest worker {r['worker_mb']:.0f} MB" if workers > 1 else "")
            )
        t10, t50 = rows[0][2]["seconds"], rows[1][2]["seconds"]
        print(
            f"time grows {t50 / t10:.2f}x from 10 to {args.max} images ({args.max / 10:.0f}x the images); "
            f"2 workers are {t50 / rows[2][2]['seconds']:.2f}x as fast as 1"
        )


if __name__ == "__main__":
    main()
