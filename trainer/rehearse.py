"""`flux2-lora rehearse`: a preset's own training code path at the real model's width, on random weights, with
every phase's measured peak set beside the planner's figure for it.

A random model of the size `model.path` names is written in the hub's folder layout (inference/real_size.py;
`--layers D,S` cuts its depth, keeping the widths) and loaded through the normal `model.path` loader; the preset
then runs unchanged apart from what a rehearsal needs (a few steps, one in-training sample, a scratch folder):
cache fill (text encoder, VAE), transformer load (quantised, checkpointed, offloaded as configured), steps, sample,
save and every `output.export` layout. The LoRA and its exports are then loaded back on the random model, by
stock diffusers and by flux2-lora, and every module must be applied.

Measured per phase: seconds; host RAM as the peak resident size above the process's own at the start (the
kernel's high-water mark, reset per phase); on CUDA, `max_memory_allocated`. A phase more than 10 % over its plan
makes the command exit 1: the planner is wrong there, and its fix belongs in the planner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from common.errors import UserError
from trainer.phases import Phases

TOLERANCE = 1.10  # a phase may use 10 % more than planned before the plan counts as wrong
GIB = 1024**3


def _rss(field: str) -> int:
    """The process's resident size (VmRSS) or its high-water mark (VmHWM), in bytes (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024


def _release() -> None:
    """Collect garbage and hand free heap pages back to the kernel (glibc keeps freed small blocks otherwise), so a
    phase's resident size counts what it holds, not what an earlier phase left in the allocator."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> None:
    # resets VmHWM to the current resident size; elsewhere (not Linux) the peak runs from the process start
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage Python holds (each storage once): parameters, buffers, the cache."""
    import torch

    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except (RuntimeError, ReferenceError, NotImplementedError):
            continue  # tensors that have no storage of their own (sparse, wrapper subclasses)
    return total


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null for a moment: what C++ code prints there is dropped."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def tensor_peak() -> Iterator[list[int]]:
    """Peak CPU tensor bytes allocated above the start while the block runs (the profiler's allocation events
    in order): the CPU's max_memory_allocated."""
    from torch.profiler import ProfilerActivity, profile

    result = [0]
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's C++ side announces its start and stop on stderr
        prof.__enter__()
    try:
        yield result
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    # the raw allocation events in time order: building function_events instead takes 50x longer (minutes for
    # one training step)
    from torch.autograd import DeviceType

    changes = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    result[0] = peak


@dataclasses.dataclass
class Measured:
    seconds: float = 0.0
    tensors: int = (
        0  # peak bytes of tensors (CUDA: max_memory_allocated; CPU: live at the start + peak above)
    )
    rss: int = 0  # peak resident bytes of the process above its own at the start (the host's view)
    times: int = 0


class MemoryWatcher(Phases):
    """Measures every phase the run names (trainer/phases.py): peak tensor bytes on the run's device (what the
    planner plans) and the host's resident size."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        _release()
        self.baseline = _rss("VmRSS")
        self.seen: dict[str, Measured] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        import torch

        _release()
        m = self.seen.setdefault(name, Measured())
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = 0 if self.cuda else live_tensor_bytes()
        _reset_peak()
        started = time.perf_counter()
        with contextlib.nullcontext([0]) if self.cuda else tensor_peak() as above:
            yield
        m.seconds += time.perf_counter() - started
        if self.cuda:
            torch.cuda.synchronize()
            m.tensors = max(m.tensors, torch.cuda.max_memory_allocated())
        else:
            m.tensors = max(m.tensors, start + above[0])
        m.rss = max(m.rss, _rss("VmHWM") - self.baseline)
        m.times += 1


@dataclasses.dataclass
class Options:
    config: str
    overrides: list[str]
    steps: int = 2
    layers: tuple[int, int] | None = None
    model_dir: str | None = None
    json_path: str | None = None
    show_progress: bool = True
    # the drawn sample set's size when the preset's data.path is not a folder: each phase's peak is one
    # caption's or one image's, so a few show the same peaks sooner
    images: int = 12


def parse_layers(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        double, single = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--layers '{text}' must be DOUBLE,SINGLE block counts, e.g. 1,1") from None
    if double < 0 or single < 0 or double + single == 0:
        raise UserError(f"--layers '{text}': keep at least one block, and no negative counts")
    return double, single


def _scratch_overrides(cfg, work: Path, model: Path, data: Path, steps: int) -> list[str]:
    """What a rehearsal changes in the preset: its model and data, a scratch run and cache, N steps and one
    in-training sample, no tracker, and no memory refusal (it measures instead)."""
    prompts = cfg.sample.prompts or [f"{cfg.data.trigger or 'zxq'} logo on a white background"]
    return [
        f"model.path={model}",
        f"data.path={data}",
        f"output.dir={work / 'run'}",
        "output.overwrite=true",
        "output.report_to=none",
        f"cache.dir={work / 'cache'}",
        f"train.steps={steps}",
        "memory.check=false",
        f"sample.prompts={json.dumps(prompts[:1])}",
        f"sample.every={steps}",
        "sample.steps=1",
        "sample.before_after=false",
        "checkpoint.every=0",
    ]


def rehearse(opts: Options) -> int:
    import torch

    from data_tools.sample_data import write_sample_data
    from inference.loading import DTYPES, resolve_base_model
    from inference.real_size import real_variants, write_real_size_model
    from trainer.config import load_config
    from trainer.memory import plan_training
    from trainer.recipe import run

    preset = load_config(
        opts.config, opts.overrides
    )  # a typo fails here, before anything is written
    known = real_variants()
    if preset.model.path not in known:
        raise UserError(
            f"model.path '{preset.model.path}': rehearse builds the model from its shipped architecture, "
            f"so it must name one ({', '.join(known)})"
        )
    if opts.steps < 1:
        raise UserError(f"--steps must be at least 1, got {opts.steps}")
    if opts.images < 2:
        raise UserError(
            f"--images must be at least 2 (one is held out for validation), got {opts.images}"
        )
    full = opts.layers is None
    work = Path(tempfile.mkdtemp(prefix="flux2-lora-rehearse-"))
    try:
        model = Path(opts.model_dir) if opts.model_dir else work / "model"
        if not (model / "model_index.json").is_file():
            print(
                f"writing a random {preset.model.path} ({'full size' if full else f'{opts.layers} blocks'}) to "
                f"{model}",
                flush=True,
            )
            write_real_size_model(model, preset.model.path, opts.layers, DTYPES[preset.model.dtype])
        data = Path(preset.data.path)
        if not data.is_dir():
            data = write_sample_data(
                work / "data", count=opts.images, trigger=preset.data.trigger or "zxq"
            )
        cfg = load_config(
            opts.config,
            [*opts.overrides, *_scratch_overrides(preset, work, model, data, opts.steps)],
        )
        on_gpu = torch.cuda.is_available()
        plan = plan_training(cfg, resolve_base_model(cfg.model), on_gpu=on_gpu)
        watcher = MemoryWatcher(on_gpu)
        result = run(cfg, show_progress=opts.show_progress, phases=watcher)
        loads = _check_loras(cfg, result.lora_path.parent)
        report = _report(plan, watcher, loads)
        print(_render(report, preset.model.path, opts.layers))
        if opts.json_path:
            from common.atomic import write_text

            write_text(Path(opts.json_path), json.dumps(report, indent=2) + "\n")
        over = [p["name"] for p in report["phases"] if p.get("over_plan")]
        failed = [lo["path"] for lo in report["loras"] if not lo["every_module"]]
        if over:
            print(
                f"error: measured above plan by more than {TOLERANCE - 1:.0%} in: {', '.join(over)}; the planner "
                "is wrong there (trainer/memory.py)"
            )
        if failed:
            print(f"error: not every module of {', '.join(failed)} was applied on reload")
        return 1 if over or failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_loras(cfg, run_dir: Path) -> list[dict]:
    """Every LoRA file the run wrote, loaded on the random model by stock diffusers (our diffusers-layout files)
    and by flux2-lora (every layout): the modules each applied, against the file's."""
    from inference.adapter_kinds import module_of
    from inference.adapters import load_adapter
    from inference.loading import resolve_base_model
    from inference.lora_io import read_header, read_keys

    base = resolve_base_model(cfg.model)
    rows, pipe = [], None
    for path in sorted(run_dir.glob("pytorch_lora_weights*.safetensors")):
        wanted = {module_of(k) for k in read_keys(path)} - {None}
        stock = read_header(path).get("flux2_lora.layout", "diffusers") == "diffusers"
        applied = {}
        for loader in (["diffusers"] if stock else []) + ["flux2-lora"]:
            if pipe is None:
                pipe = base.family.pipeline_class.from_pretrained(
                    cfg.model.path, text_encoder=None, tokenizer=None, vae=None
                )
            if loader == "diffusers":
                pipe.load_lora_weights(
                    str(path.parent), weight_name=path.name, adapter_name="check"
                )
            else:
                load_adapter(pipe, base.family.name, path, "check")
            applied[loader] = _adapted(pipe)
            # one load of the base for every check: unloading restores it (else load it again)
            pipe.unload_lora_weights()
            if _adapted(pipe):
                pipe = None
                gc.collect()
        # our own loader splits a fused qkv into its three modules, so it may apply more than the file names
        rows.append(
            {
                "path": path.name,
                "modules": len(wanted),
                "applied": applied,
                "every_module": all(n >= len(wanted) for n in applied.values()),
            }
        )
    return rows


def _adapted(pipe) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())


def _report(plan, watcher: MemoryWatcher, loads: list[dict]) -> dict:
    """Per phase: measured peak tensor bytes against the plan's (GPU bytes on CUDA without the CUDA context; on
    the CPU, the phase's RAM without the process's own), and the host's resident size beside."""
    from trainer.memory import CUDA_CONTEXT_GIB

    planned = {p.name: p for p in plan.phases}
    phases = []
    for name, m in watcher.seen.items():
        p = planned.get(name)
        if p is None:
            plan_bytes = None
        elif watcher.cuda:
            plan_bytes = p.gpu - CUDA_CONTEXT_GIB * GIB
        else:
            plan_bytes = p.ram - plan.process_ram
        phases.append(
            {
                "name": name,
                "seconds": round(m.seconds, 1),
                "measured_gib": round(m.tensors / GIB, 2),
                "planned_gib": round(plan_bytes / GIB, 2) if plan_bytes is not None else None,
                "host_rss_gib": round(m.rss / GIB, 2),
                "over_plan": plan_bytes is not None and m.tensors > TOLERANCE * plan_bytes,
            }
        )
    return {
        "model": plan.label,
        "device": "cuda" if watcher.cuda else "cpu",
        "process_ram_gib": round(watcher.baseline / GIB, 2),
        "phases": phases,
        "lora": {
            "path": loads[0]["path"] if loads else None,
            "tensors": loads[0]["modules"] if loads else 0,
        },
        "loras": loads,
    }


def _render(report: dict, model: str, layers) -> str:
    size = (
        "full size"
        if layers is None
        else f"{layers[0]} double + {layers[1]} single blocks at real width"
    )
    where = "GPU tensors" if report["device"] == "cuda" else "CPU tensors"
    lines = [
        f"rehearsal of {model} ({size}): {report['model']}",
        "",
        f"{'phase':32s} {'seconds':>8s} {where + ' GiB':>16s} {'planned':>8s} {'ratio':>6s} {'host RSS':>9s}",
    ]

    def num(value) -> str:
        return "—" if value is None else f"{value:.2f}"

    for p in report["phases"]:
        plan = p["planned_gib"]
        ratio = f"{p['measured_gib'] / plan:.2f}" if plan else "—"
        lines.append(
            f"{p['name']:32s} {p['seconds']:8.1f} {num(p['measured_gib']):>16s} {num(plan):>8s} "
            f"{ratio:>6s} {num(p['host_rss_gib']):>9s}" + ("  over plan" if p["over_plan"] else "")
        )
    lines.append(
        f"(host RSS: the process's resident size above its own {report['process_ram_gib']:.1f} GiB at the "
        "start, memory-mapped weights counted as they are read)"
    )
    lines.append("")
    for lo in report["loras"]:
        lines.append(
            f"{lo['path']}: {lo['modules']} modules; applied on reload: "
            + ", ".join(f"{k} {v}" for k, v in lo["applied"].items())
        )
    return "\n".join(lines)
