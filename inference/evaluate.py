"""Adapter evaluation: render a prompt suite across adapters/checkpoints x scales x seeds, measure, recommend.

The base loads once; adapters are hot-swapped; base images (scale 0) are rendered once per prompt and seed and
reused for every adapter's scale-0 column and for leakage. Everything is seeded: same inputs, same metrics.

Recommendation rule (also in report.html): among columns with scale > 0, maximise
    score = fidelity - leakage
where fidelity is, by availability, the reference similarity (needs --encoder and --references), else
1 - min(colour dE, 50)/50 on colour prompts, else 1 - character error rate on text prompts. Ties go to the
smaller scale, then the earlier checkpoint. With no fidelity metric at all, the latest adapter is recommended at
the largest scale whose leakage is <= 0.25 (else its smallest scale).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from data_tools.atomic import atomic_dir
from data_tools.errors import UserError
from data_tools.images import decode_rgb
from inference import metrics as M
from inference.lora_io import WEIGHT_NAME
from inference.suites import Suite, render_prompt

LEAKAGE_LIMIT = 0.25
METRICS = ("reference_similarity", "colour_delta_e", "leakage", "diversity", "text_error")
DIRECTION = {"reference_similarity": "higher is better", "colour_delta_e": "lower is better",
             "leakage": "lower is better", "diversity": "higher is more varied", "text_error": "lower is better"}


@dataclasses.dataclass(frozen=True)
class Adapter:
    label: str
    path: Path
    step: int | None = None


def adapters_from_run(run_dir: str | Path) -> list[Adapter]:
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"--run '{run}' is not a folder; pass a training output.dir")
    found = []
    for ckpt in (run / "checkpoints").glob("step-*"):
        if ckpt.name[5:].isdigit() and (ckpt / WEIGHT_NAME).is_file():
            found.append(Adapter(ckpt.name, ckpt / WEIGHT_NAME, int(ckpt.name[5:])))
    found.sort(key=lambda a: a.step)
    if (run / WEIGHT_NAME).is_file():
        steps = None
        config = run / "config.yaml"
        if config.is_file():
            match = re.search(r"^\s+steps:\s*(\d+)", config.read_text(), re.MULTILINE)
            steps = int(match.group(1)) if match else None
        if not found or steps is None or steps > found[-1].step:
            found.append(Adapter("final", run / WEIGHT_NAME, steps))
    if not found:
        raise UserError(f"--run '{run}' holds no checkpoints (checkpoints/step-N/{WEIGHT_NAME}) and no final LoRA")
    return found


def load_references(spec: str | Path) -> list[Image.Image]:
    from data_tools.sources import open_source, read_bytes

    source = open_source(spec, recursive=True)
    images = []
    for entry in source.entries:
        try:
            images.append(decode_rgb(read_bytes(source, entry), entry.name))
        except UserError:
            continue  # broken files are prepare's business; evaluation uses what it can read
    if not images:
        raise UserError(f"--references '{spec}' holds no readable images")
    return images


@dataclasses.dataclass
class Column:
    adapter: Adapter | None  # None: the base model
    scale: float

    @property
    def label(self) -> str:
        return "base" if self.adapter is None else f"{self.adapter.label} x{self.scale:g}"


def evaluate(model: str, adapters: Sequence[Adapter], suite: Suite, out: str | Path, *, scales: Sequence[float] = (0, 0.5, 1.0),
             seeds: int = 3, references: str | Path | None = None, encoder: str | Path | None = None,
             trigger: str | None = None, steps: int | None = None, width: int = 512, height: int = 512,
             guidance: float | None = None, show_progress: bool = True) -> dict[str, Any]:
    from inference.generate import Generator

    if not adapters:
        raise UserError("nothing to evaluate: pass --lora FILE or --run OUTPUT_DIR")
    refs = load_references(references) if references else []
    if suite.needs_references() > len(refs):
        raise UserError(f"suite '{suite.name}' has edit prompts needing {suite.needs_references()} reference images; "
                        f"pass --references with at least that many")
    image_encoder = M.ImageEncoder(encoder) if encoder else None
    ref_embeddings = image_encoder.embed(refs) if image_encoder and refs else None
    gen = Generator(model)
    for adapter in adapters:  # fail early on a missing or foreign adapter, before any rendering
        info = gen.add_adapter(adapter.path, name="probe")
        trigger = trigger if trigger is not None else (info.trigger or None)
        gen.remove_adapter("probe")
    trigger = trigger or ""
    jobs = [(p, s) for p in suite.prompts for s in range(seeds)]

    def render() -> dict[tuple[str, int], Image.Image]:
        images = {}
        for prompt, seed in jobs:
            kwargs = dict(references=refs[: prompt.references]) if prompt.kind == "edit" else {}
            images[(prompt.id, seed)] = gen.generate(render_prompt(prompt, trigger), seed=seed, steps=steps, width=width,
                                                     height=height, guidance=guidance, **kwargs)[0].image
            bar.update()
        return images

    positive = [s for s in scales if s != 0]
    bar = tqdm(total=len(jobs) * (1 + len(adapters) * len(positive)), desc="rendering", disable=not show_progress)
    base_images = render()
    columns: list[tuple[Column, dict]] = [(Column(None, 0.0), base_images)]
    for adapter in adapters:
        gen.add_adapter(adapter.path, name="under_test")
        for scale in scales:
            if scale == 0:
                columns.append((Column(adapter, 0.0), base_images))  # the adapter at scale 0 is the base
                continue
            gen.set_scales({"under_test": float(scale)})
            columns.append((Column(adapter, float(scale)), render()))
        gen.remove_adapter("under_test")
    bar.close()

    rows, summary = _measure(suite, columns, base_images, seeds, image_encoder, ref_embeddings)
    unavailable = {}
    if image_encoder is None or ref_embeddings is None:
        unavailable["reference_similarity"] = "needs --encoder (a local CLIP/SigLIP/DINOv2 folder) and --references"
    if not M.ocr_available():
        unavailable["text_error"] = "needs the ocr extra: pip install 'flux2-lora[ocr]'"
    if seeds < 2:
        unavailable["diversity"] = "needs --seeds 2 or more"
    recommendation = recommend(summary)
    result = {"suite": suite.name, "model": str(model), "trigger": trigger, "scales": list(map(float, scales)),
              "seeds": seeds, "steps": steps, "width": width, "height": height, "columns": summary, "prompts": rows,
              "unavailable": unavailable, "recommendation": recommendation, "directions": DIRECTION}
    from inference.eval_report import write_outputs

    with atomic_dir(out) as tmp:
        write_outputs(tmp, result, suite, columns, seeds)
    return result


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _measure(suite: Suite, columns, base_images, seeds: int, encoder, ref_embeddings):
    rows, summary = [], []
    for column, images in columns:
        per_prompt = []
        for prompt in suite.prompts:
            shots = [images[(prompt.id, s)] for s in range(seeds)]
            row = {"column": column.label, "adapter": column.adapter.label if column.adapter else "base",
                   "step": column.adapter.step if column.adapter else None, "scale": column.scale,
                   "prompt": prompt.id, "kind": prompt.kind}
            row["colour_delta_e"] = _mean(M.colour_delta_e(im, c) for im in shots for c in prompt.colours) \
                if prompt.kind == "colour" else None
            row["reference_similarity"] = encoder.similarity(shots, ref_embeddings) \
                if encoder is not None and ref_embeddings is not None and prompt.kind in ("identity", "context", "edit") else None
            row["leakage"] = _mean(M.leakage(base_images[(prompt.id, s)], images[(prompt.id, s)]) for s in range(seeds)) \
                if prompt.kind == "leakage" else None
            row["diversity"] = M.diversity(shots)
            row["text_error"] = _mean(M.text_error(im, prompt.expected_text) for im in shots) \
                if prompt.kind == "text" else None
            per_prompt.append(row)
        rows += per_prompt
        summary.append({"column": column.label, "adapter": column.adapter.label if column.adapter else "base",
                        "step": column.adapter.step if column.adapter else None, "scale": column.scale,
                        "metrics": {m: _mean(r[m] for r in per_prompt) for m in METRICS}})
    return rows, summary


def _fidelity(metrics: dict) -> float | None:
    if metrics["reference_similarity"] is not None:
        return metrics["reference_similarity"]
    if metrics["colour_delta_e"] is not None:
        return 1.0 - min(metrics["colour_delta_e"], 50.0) / 50.0
    if metrics["text_error"] is not None:
        return 1.0 - metrics["text_error"]
    return None


def recommend(summary: list[dict]) -> dict[str, Any] | None:
    candidates = [c for c in summary if c["adapter"] != "base" and c["scale"] > 0]
    if not candidates:
        return None
    order = {c["adapter"]: i for i, c in enumerate(candidates)}  # evaluation order = checkpoint order
    scored = [(c, _fidelity(c["metrics"])) for c in candidates]
    if all(f is not None for _, f in scored):
        def key(item):
            c, fidelity = item
            return (-(fidelity - (c["metrics"]["leakage"] or 0.0)), c["scale"], order[c["adapter"]])

        best, fidelity = min(scored, key=key)
        why = (f"highest fidelity - leakage = {fidelity:.3f} - {best['metrics']['leakage'] or 0:.3f}")
    else:
        latest = max(order.values())
        pool = [c for c in candidates if order[c["adapter"]] == latest]
        within = [c for c in pool if (c["metrics"]["leakage"] or 0.0) <= LEAKAGE_LIMIT]
        best = max(within, key=lambda c: c["scale"]) if within else min(pool, key=lambda c: c["scale"])
        why = f"no fidelity metric available: latest adapter at the largest scale with leakage <= {LEAKAGE_LIMIT}"
    return {"adapter": best["adapter"], "step": best["step"], "scale": best["scale"], "column": best["column"], "why": why}
