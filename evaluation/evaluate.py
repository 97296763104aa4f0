"""Adapter evaluation: render a prompt suite across adapters/checkpoints x scales x seeds, measure, recommend.

The base loads once; adapters are hot-swapped; each adapter is prompted with its own trigger word (or the one
given); base images (scale 0) are rendered once per prompt, seed and trigger and reused for every scale-0 column
and for leakage. Everything is seeded: same inputs, same metrics.

Recommendation rule (also in report.html): among columns with scale > 0, maximise
    score = fidelity - leakage
where fidelity is, by availability, the reference similarity (needs --encoder and --references), else
1 - min(colour dE, 50)/50 on colour prompts, else 1 - character error rate on text prompts. Ties go to the
smaller scale, then the earlier checkpoint. With no fidelity metric at all, the latest adapter is recommended at
the largest scale. A column whose leakage exceeds 0.25 (LEAKAGE_LIMIT) is never recommended: when all do, nothing
is.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from common.atomic import atomic_dir
from common.configtree import from_kwargs, option, positive
from common.errors import UserError
from common.images import decode_rgb
from common.limits import side_problem
from data_tools.sources import open_source, read_bytes
from evaluation import metrics as M
from evaluation.metrics import DIRECTION, LEAKAGE_LIMIT, METRICS
from evaluation.report import write_outputs
from evaluation.suites import Suite, render_prompt
from inference.generate import Generator, GeneratorOptions
from inference.runs import lora_file, lora_label, run_loras


@dataclasses.dataclass(frozen=True)
class Adapter:
    label: str
    path: Path
    step: int | None = None


def adapters_from_run(run_dir: str | Path) -> list[Adapter]:
    """Every checkpoint of a run and its final LoRA (inference/runs.py reads the folder)."""
    return [Adapter(r.label, r.path, r.step) for r in run_loras(run_dir)]


def adapters_from_files(paths: Sequence[str | Path]) -> list[Adapter]:
    """LoRA files (or run folders), named by their run folder; equal names get -2, -3, ... so outputs never clash."""
    adapters, seen = [], {}
    for path in paths:
        label = lora_label(path)
        seen[label] = seen.get(label, 0) + 1
        adapters.append(
            Adapter(label if seen[label] == 1 else f"{label}-{seen[label]}", lora_file(path))
        )
    return adapters


def load_references(spec: str | Path) -> list[Image.Image]:
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


def _scales_problem(scales: list[float]) -> str | None:
    if not scales or any(s < 0 for s in scales):
        return f"must be one or more numbers >= 0, got {scales}"
    return None


@dataclasses.dataclass
class EvaluateOptions(GeneratorOptions):
    """What `evaluate` renders and measures: the CLI's flags and `evaluate(...)`'s keyword arguments. Placement and
    memory options (device, dtype, quantize, group offload, ...) are `generate`'s, inherited."""

    scales: list[float] = option(
        factory=lambda: [0.0, 0.5, 1.0],
        check=_scales_problem,
        help="LoRA scales (0 = the base model)",
    )
    seeds: int = option(3, check=positive, help="seeds per prompt")
    references: str | None = option(
        None, help="training images (folder, zip, datasets folder or prepared DIR)"
    )
    encoder: str | None = option(
        None, help="local vision model for reference similarity (CLIP, SigLIP, DINOv2)"
    )
    trigger: str | None = option(
        None, help="replaces every adapter's own trigger word in the prompts"
    )
    steps: int | None = option(None, check=positive, help="denoising steps (default: the family's)")
    guidance: float | None = option(None, help="guidance scale (default: the family's)")
    width: int = option(512, check=side_problem, help="render width")
    height: int = option(512, check=side_problem, help="render height")


@dataclasses.dataclass
class Column:
    adapter: Adapter | None  # None: the base model
    scale: float
    trigger: str
    base_label: str = "base"

    @property
    def label(self) -> str:
        return self.base_label if self.adapter is None else f"{self.adapter.label} x{self.scale:g}"


def evaluate(
    model: str,
    adapters: Sequence[Adapter],
    suite: Suite,
    out: str | Path,
    *,
    show_progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """`options`: the fields of EvaluateOptions (scales=(0, 1), seeds=2, steps=8, ...), checked as the CLI's are.
    Reads: check everything → render every column → measure → write the report."""
    opts = from_kwargs(EvaluateOptions, "evaluate", **options)
    if not adapters:
        raise UserError("nothing to evaluate: pass --lora FILE or --run OUTPUT_DIR")
    labels = [a.label for a in adapters]
    if len(set(labels)) != len(labels):
        raise UserError(
            f"adapter names repeat ({', '.join(sorted({x for x in labels if labels.count(x) > 1}))}); "
            "give every adapter its own label"
        )
    refs = load_references(opts.references) if opts.references else []
    if suite.needs_references() > len(refs):
        raise UserError(
            f"suite '{suite.name}' has edit prompts needing {suite.needs_references()} reference images; "
            f"pass --references with at least that many"
        )
    image_encoder = M.ImageEncoder(opts.encoder) if opts.encoder else None
    ref_embeddings = image_encoder.embed(refs) if image_encoder and refs else None
    placement = {f.name: getattr(opts, f.name) for f in dataclasses.fields(GeneratorOptions)}
    gen = Generator(model, **placement)  # device "auto": the GPU and bfloat16 when there is one
    triggers = {}
    for adapter in adapters:  # fail early on a missing or foreign adapter, before any rendering
        info = gen.add_adapter(adapter.path, name="probe")
        triggers[adapter.label] = opts.trigger if opts.trigger is not None else info.trigger
        gen.remove_adapter("probe")
    renderer = _Renderer(
        gen,
        suite,
        refs,
        opts,
        show_progress,
        total=len(set(triggers.values())) + len(adapters) * len([s for s in opts.scales if s]),
    )
    columns, base = renderer.columns(adapters, triggers)
    rows, summary = _measure(suite, columns, base, opts.seeds, image_encoder, ref_embeddings)
    unavailable = {}
    if image_encoder is None or ref_embeddings is None:
        unavailable["reference_similarity"] = (
            "needs --encoder (a local CLIP/SigLIP/DINOv2 folder) and --references"
        )
    if not M.ocr_available():
        unavailable["text_error"] = "needs the ocr extra: pip install 'flux2-lora[ocr]'"
    if opts.seeds < 2:
        unavailable["diversity"] = "needs --seeds 2 or more"
    result = {
        "suite": suite.name,
        "model": str(model),
        "trigger": ", ".join(w or "(none)" for w in base),
        "triggers": triggers,
        "scales": sorted(set(map(float, opts.scales))),
        "seeds": opts.seeds,
        "steps": opts.steps,
        "width": opts.width,
        "height": opts.height,
        "columns": summary,
        "prompts": rows,
        "unavailable": unavailable,
        "recommendation": recommend(summary),
        "directions": DIRECTION,
        "speed": renderer.speed(),
    }
    with atomic_dir(out) as tmp:
        write_outputs(tmp, result, suite, columns, opts.seeds)
    return result


class _Renderer:
    """Renders the suite for the base and each adapter x scale, seeds batched, counting images and time."""

    def __init__(
        self,
        gen: Generator,
        suite: Suite,
        refs: list[Image.Image],
        opts: EvaluateOptions,
        show_progress: bool,
        total: int,
    ):
        self.gen, self.suite, self.refs, self.opts = gen, suite, refs, opts
        self.bar = tqdm(
            total=total * len(suite.prompts) * opts.seeds,
            desc="rendering",
            unit="image",
            disable=not show_progress,
        )
        self.done, self.seconds = 0, 0.0

    def render(self, trigger: str) -> dict[tuple[str, int], Image.Image]:
        """Every prompt of the suite, all seeds in one batch (seed s is the same picture as alone, bar rounding)."""
        started, images, o = time.perf_counter(), {}, self.opts
        for prompt in self.suite.prompts:
            kwargs = (
                dict(references=self.refs[: prompt.references]) if prompt.kind == "edit" else {}
            )
            made = self.gen.generate(
                render_prompt(prompt, trigger),
                seed=0,
                num_images=o.seeds,
                steps=o.steps,
                width=o.width,
                height=o.height,
                guidance=o.guidance,
                **kwargs,
            )
            images.update({(prompt.id, s): m.image for s, m in enumerate(made)})
            self.bar.update(o.seeds)
            self.done += o.seeds
        self.seconds += time.perf_counter() - started
        return images

    def columns(self, adapters: Sequence[Adapter], triggers: dict[str, str]):
        """-> ([(Column, images)], {trigger: base images}). Scale 0 is the base: rendered once per trigger."""
        distinct = list(dict.fromkeys(triggers.values()))
        base = {word: self.render(word) for word in distinct}
        columns = [
            (
                Column(
                    None, 0.0, w, "base" if len(distinct) == 1 else f"base [{w or 'no trigger'}]"
                ),
                base[w],
            )
            for w in distinct
        ]
        for adapter in adapters:
            word = triggers[adapter.label]
            self.gen.add_adapter(adapter.path, name="under_test")
            for scale in sorted(set(self.opts.scales)):
                if scale == 0:
                    columns.append((Column(adapter, 0.0, word), base[word]))
                    continue
                self.gen.set_scales({"under_test": float(scale)})
                columns.append((Column(adapter, float(scale), word), self.render(word)))
            self.gen.remove_adapter("under_test")
        self.bar.close()
        return columns, base

    def speed(self) -> dict[str, Any]:
        return {
            "renders": self.done,
            "render_seconds": round(self.seconds, 3),
            "renders_per_second": round(self.done / max(self.seconds, 1e-9), 3),
            "text_encoder_calls": self.gen.text_encoder_calls,
        }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _measure(suite: Suite, columns, base: dict[str, dict], seeds: int, encoder, ref_embeddings):
    rows, summary = [], []
    for column, images in columns:
        base_images = base[column.trigger]
        per_prompt = []
        for prompt in suite.prompts:
            shots = [images[(prompt.id, s)] for s in range(seeds)]
            row = {
                "column": column.label,
                "adapter": column.adapter.label if column.adapter else "base",
                "step": column.adapter.step if column.adapter else None,
                "scale": column.scale,
                "prompt": prompt.id,
                "kind": prompt.kind,
            }
            row["colour_delta_e"] = (
                _mean(M.colour_delta_e(im, c) for im in shots for c in prompt.colours)
                if prompt.kind == "colour"
                else None
            )
            row["reference_similarity"] = (
                encoder.similarity(shots, ref_embeddings)
                if encoder is not None
                and ref_embeddings is not None
                and prompt.kind in ("identity", "context", "edit")
                else None
            )
            row["leakage"] = (
                _mean(
                    M.leakage(base_images[(prompt.id, s)], images[(prompt.id, s)])
                    for s in range(seeds)
                )
                if prompt.kind == "leakage"
                else None
            )
            row["diversity"] = M.diversity(shots)
            row["text_error"] = (
                _mean(M.text_error(im, prompt.expected_text) for im in shots)
                if prompt.kind == "text"
                else None
            )
            per_prompt.append(row)
        rows += per_prompt
        summary.append(
            {
                "column": column.label,
                "adapter": column.adapter.label if column.adapter else "base",
                "step": column.adapter.step if column.adapter else None,
                "scale": column.scale,
                "metrics": {m: _mean(r[m] for r in per_prompt) for m in METRICS},
            }
        )
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
    """The column to use, or None without adapter columns. A column whose leakage exceeds LEAKAGE_LIMIT is never
    recommended, whatever its fidelity: it paints the subject into prompts that did not ask for it. When every
    column does, the recommendation says so and names none (adapter None)."""
    candidates = [c for c in summary if c["adapter"] != "base" and c["scale"] > 0]
    if not candidates:
        return None
    # evaluation order = checkpoint order
    order = {c["adapter"]: i for i, c in enumerate(candidates)}
    leak = {id(c): c["metrics"]["leakage"] or 0.0 for c in candidates}
    within = [c for c in candidates if leak[id(c)] <= LEAKAGE_LIMIT]
    if not within:
        least = min(candidates, key=lambda c: (leak[id(c)], c["scale"]))
        return {
            "adapter": None,
            "step": None,
            "scale": None,
            "column": None,
            "why": f"every column changes prompts without the trigger by more than the leakage limit "
            f"{LEAKAGE_LIMIT} (least: {least['column']}, {leak[id(least)]:.2f}); lower the scale, "
            "train fewer steps or with regularization.preserve",
        }
    scored = [(c, _fidelity(c["metrics"])) for c in within]
    if all(f is not None for _, f in scored):

        def key(item):
            c, fidelity = item
            return (-(fidelity - leak[id(c)]), c["scale"], order[c["adapter"]])

        best, fidelity = min(scored, key=key)
        why = (
            f"highest fidelity - leakage = {fidelity:.3f} - {leak[id(best)]:.3f} among columns with "
            f"leakage <= {LEAKAGE_LIMIT}"
        )
    else:
        latest = max(order[c["adapter"]] for c in within)
        best = max((c for c in within if order[c["adapter"]] == latest), key=lambda c: c["scale"])
        why = f"no fidelity metric available: latest adapter at the largest scale with leakage <= {LEAKAGE_LIMIT}"
    return {
        "adapter": best["adapter"],
        "step": best["step"],
        "scale": best["scale"],
        "column": best["column"],
        "why": why,
    }
