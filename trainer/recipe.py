"""The training recipe, in three phases that read top to bottom: setup, loop, finish."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.atomic import write_text
from common.configtree import to_dict
from common.errors import Interrupted, UserError
from inference.loading import (
    DTYPES,
    BaseModel,
    apply_memory_options,
    load_pipeline,
)
from inference.lora_io import WEIGHT_NAME, save_lora
from inference.runs import CONFIG_FILE, EMA_WEIGHT_NAME
from trainer import checkpoints, sharding
from trainer.batches import BatchPlan
from trainer.cache import Features, cache_layout, fill_cache, load_features
from trainer.config import Config, dump_config
from trainer.ema import LoraEMA
from trainer.lora import add_lora, trainable_parameters
from trainer.optim import build_optimizer, build_scheduler
from trainer.outputs import (
    card_base_model,
    export_copies,
    model_card,
    prepare_output_dir,
    write_card,
)
from trainer.phases import LOAD, QUIET, SAMPLES, SAVE, STEP, Phases
from trainer.preflight import preflight
from trainer.samples import SampleRenderer
from trainer.signals import StopRequest
from trainer.step import BatchSource, micro_batch_loss, step_generator
from trainer.training_data import TrainingData
from trainer.validation import validation_loss, write_curve

log = logging.getLogger("flux2_lora.train")


@dataclasses.dataclass
class TrainResult:
    lora_path: Path
    # the trained transformer with its LoRA, for callers that keep going in-process
    transformer: torch.nn.Module
    text_encoder_calls: int
    vae_calls: int
    loop_seconds: float  # wall time of the training loop alone (no loading, caching or saving)
    step_seconds: list[float]  # wall time of each optimizer step (checkpoints and samples included)


class TrainingInterrupted(Interrupted):
    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; checkpoint saved at '{checkpoint}' "
            "(continue with resume=latest)",
            signum,
        )


@dataclasses.dataclass
class Run:
    """What setup builds and the loop and finish use."""

    cfg: Config
    base: BaseModel
    data: TrainingData
    out: Path
    accelerator: Any
    features: Features
    transformer: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    sampler: SampleRenderer | None
    start: int  # the step to continue from (0, or a resumed checkpoint's)
    show_progress: bool
    ema: LoraEMA | None = None
    phases: Phases = QUIET
    batches: BatchSource | None = None  # what the loop and validation draw micro-batches from
    # the unwrapped transformer (preservation switches its adapter off)
    plain: torch.nn.Module | None = None
    # FSDP: every rank runs forwards (samples, validation) and takes part in gathers
    shards: sharding.Sharding = sharding.Sharding(False)
    step: int = 0  # steps done; read by the LoRA header of checkpoints
    # (step, held-out loss)
    validation: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    def lora_info(self) -> dict:
        """The flux2_lora.* header entries of every LoRA file this run writes."""
        return {
            "family": self.base.family.name,
            "base_model": self.base.path,
            "trigger": self.cfg.data.trigger or "",
            "type": self.cfg.lora.type,
            "rank": self.cfg.lora.rank,
            "alpha": self.cfg.lora.alpha,
            "targets": self.cfg.lora.targets,
            "step": self.step,
        }


def run(cfg: Config, show_progress: bool = True, phases: Phases = QUIET) -> TrainResult:
    """Train. `phases`: told when each named phase (trainer/phases.py) starts and ends (the rehearsal measures
    them)."""
    r = setup(cfg, show_progress, phases)
    loop_seconds, step_seconds = loop(r)
    finish(r)
    return TrainResult(
        r.out / WEIGHT_NAME,
        r.accelerator.unwrap_model(r.transformer),
        r.features.text_encoder_calls,
        r.features.vae_calls,
        loop_seconds,
        step_seconds,
    )


# ---- setup: everything a user can get wrong fails here, before any weights load ------------------------------
def setup(cfg: Config, show_progress: bool, phases: Phases = QUIET) -> Run:
    started = time.perf_counter()
    out = Path(cfg.output.dir)
    # before creating anything
    resume_from = checkpoints.resolve_resume(cfg.resume, out) if cfg.resume else None
    accelerator = _accelerator(cfg, out)
    # every mistake found, in one line, before weights load
    checked = preflight(cfg, accelerator=accelerator)
    base, data = checked.base, checked.data
    shards = sharding.decide(cfg, accelerator)
    if accelerator.is_main_process:
        prepare_output_dir(cfg.output, resuming=resume_from is not None)
    accelerator.wait_for_everyone()

    main = accelerator.is_main_process
    features = _setup_features(cfg, base, data, accelerator, show_progress, phases)

    with phases.phase(LOAD):
        transformer = _setup_model(cfg, base, accelerator, shards)
        # listed once: walking every module each step costs ~1 ms
        trainable = trainable_parameters(transformer)
        optimizer = build_optimizer(trainable, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        # sharded, the model reduces its own gradients; accelerate's prepare would wrap it in DDP
        if not shards.enabled:
            # group offloading moves weights itself; accelerate must not move the whole model to the device
            placement = [cfg.model.group_offload == "none", True]
            transformer, optimizer = accelerator.prepare(
                transformer, optimizer, device_placement=placement
            )
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per optimizer step
    ema = LoraEMA(trainable, cfg.ema.decay) if cfg.ema.decay else None
    if ema:
        accelerator.register_for_checkpointing(ema)

    # sharded, every rank takes part in each forward, so every rank renders (rank 0 writes)
    sampler = (
        SampleRenderer(
            base,
            cfg.model.dtype,
            cfg.sample,
            features.embeds,
            max(cfg.train.resolutions),
            out,
            accelerator.device,
            write=main,
        )
        if cfg.sample.prompts and (main or shards.enabled)
        else None
    )
    batches = BatchSource(
        features,
        data.captions,
        cfg.train,
        cfg.flow,
        data.objective,
        base.family,
        DTYPES[cfg.model.dtype],
        accelerator.device,
    )
    r = Run(
        cfg,
        base,
        data,
        out,
        accelerator,
        features,
        transformer,
        trainable,
        optimizer,
        scheduler,
        sampler,
        start=0,
        show_progress=show_progress,
        ema=ema,
        shards=shards,
        phases=phases,
        batches=batches,
        plain=accelerator.unwrap_model(transformer),
    )
    checkpoints.register_lora_hooks(
        accelerator, base.family, r.lora_info, transformer, optimizer, shards
    )
    if resume_from is not None:
        r.start = r.step = checkpoints.load(accelerator, resume_from)
    if main:
        write_text(out / CONFIG_FILE, dump_config(cfg))
    if cfg.output.report_to != "none":
        accelerator.init_trackers(
            cfg.output.project,
            config=_flat(cfg),
            init_kwargs={"wandb": {"dir": str(out), "name": cfg.output.name or out.name}},
        )
    log.info(
        "ready to train in %.1f s (%d images; text encoder ran %d times, VAE %d times)",
        time.perf_counter() - started,
        data.subject_count,
        features.text_encoder_calls,
        features.vae_calls,
    )
    return r


def _setup_model(
    cfg: Config, base: BaseModel, accelerator, shards: sharding.Sharding
) -> torch.nn.Module:
    """The transformer ready to train: loaded (quantised as read), its adapter added, checkpointing and offload
    applied, sharded when asked."""
    log.info("loading the transformer")  # minutes for a real model: say so before the wait
    # straight to the device, layer by layer (quantised as read), unless the weights are meant to stay in RAM
    direct = (
        None if shards.enabled or cfg.model.group_offload != "none" else accelerator.device.type
    )
    transformer = load_pipeline(
        base,
        cfg.model.dtype,
        text_encoder=False,
        vae=False,
        quantize=cfg.model.quantize,
        device_map=direct,
    ).transformer
    add_lora(transformer, cfg.lora, cfg.train.seed)
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    apply_memory_options(transformer, cfg.model, accelerator.device)
    transformer.train()
    shards.apply(transformer, accelerator)  # before parameters are listed: sharding replaces them
    return transformer


def _setup_features(
    cfg: Config,
    base: BaseModel,
    data: TrainingData,
    accelerator,
    show_progress: bool,
    phases: Phases = QUIET,
) -> Features:
    """The cache, filled on every machine (no shared filesystem assumed) by all of its processes, each encoding
    its share of the missing entries (split by hash), then one barrier and every rank loads it all. A rank-0-only
    fill would keep the others waiting in a collective for as long as a 24B text encoder takes."""
    layout = cache_layout(
        data.samples,
        base,
        cfg.model,
        cfg.cache,
        extra_prompts=tuple(sorted(data.prompts() | set(cfg.sample.prompts))),
    )
    _check_same_data(accelerator, layout)
    share = (accelerator.local_process_index, local_processes(accelerator))
    calls = fill_cache(
        layout,
        data.samples,
        base,
        cfg.model,
        cfg.cache,
        show_progress and accelerator.is_local_main_process,
        accelerator.device,
        share,
        phases,
    )
    accelerator.wait_for_everyone()  # every machine's cache is complete
    features = load_features(layout, data.samples)
    per_rank = _gathered(accelerator, calls)
    features.text_encoder_calls = sum(t for t, _ in per_rank)
    features.vae_calls = sum(v for _, v in per_rank)
    if len(per_rank) > 1:
        log.info(
            "cache filled by %d processes: text encoder %s calls, VAE %s",
            len(per_rank),
            " + ".join(str(t) for t, _ in per_rank),
            " + ".join(str(v) for _, v in per_rank),
        )
    return features


def local_processes(accelerator) -> int:
    """Processes on this machine (torchrun and accelerate launch set LOCAL_WORLD_SIZE; one machine otherwise)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def _gathered(accelerator, values: tuple[int, ...]) -> list[tuple[int, ...]]:
    """`values` of every rank, in rank order (one all-gather; nothing to do in a single process)."""
    if accelerator.num_processes == 1:
        return [tuple(values)]
    mine = torch.tensor([list(values)], dtype=torch.long, device=accelerator.device)
    return [tuple(row) for row in accelerator.gather(mine).tolist()]


def _check_same_data(accelerator, layout) -> None:
    """Ranks must plan batches over the same samples: on several machines each reads its own data.path, and a
    copy that differs would train different images under the same micro-batch numbers without a word."""
    digest = hashlib.sha256("\n".join(p.name for p in layout.latents).encode()).hexdigest()
    seen = [d for (d,) in _gathered(accelerator, (int(digest[:15], 16),))]
    odd = [str(r) for r, d in enumerate(seen) if d != seen[0]]
    if odd:
        raise UserError(
            f"data.path holds different images on rank(s) {', '.join(odd)} than on rank 0 (the sample "
            "list's hashes differ); give every machine the same copy of the data"
        )


def _accelerator(cfg: Config, out: Path):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    AcceleratorState._reset_state()  # a second run in one process may use other precision settings
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation,
        log_with=None if cfg.output.report_to == "none" else cfg.output.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # NCCL's own default is 10 minutes: a rank that waits longer at any collective kills the job
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.process_timeout))
        ],
    )


# ---- loop --------------------------------------------------------------------------------------------------
def loop(r: Run) -> tuple[float, list[float]]:
    cfg, accelerator = r.cfg, r.accelerator
    # a batch shares one position-id layout: the same bucket and the same reference sizes
    layouts = [
        (s.bucket, tuple(tuple(t.shape) for t in refs))
        for s, refs in zip(r.data.samples, r.features.references)
    ][: r.data.train_count]
    plan = BatchPlan(
        layouts,
        cfg.train.batch_size,
        cfg.train.seed,
        accelerator.num_processes,
        accelerator.process_index,
    )
    sizes = plan.batch_sizes()
    log.info(
        "batches per epoch: %s (%d buckets)",
        ", ".join(f"{n} of {size}" for size, n in sorted(sizes.items(), reverse=True)),
        len(plan.groups),
    )
    stop = StopRequest()
    bar = tqdm(
        total=cfg.train.steps,
        initial=r.start,
        desc="training",
        dynamic_ncols=True,
        disable=not (r.show_progress and accelerator.is_main_process),
    )
    loop_start, step_seconds = time.perf_counter(), []
    try:
        for step in range(r.start, cfg.train.steps):
            step_start = time.perf_counter()
            with r.phases.phase(STEP):
                loss, skipped = optimizer_step(r, plan, step)
            r.scheduler.step()
            r.step = step + 1
            step_seconds.append(time.perf_counter() - step_start)
            bar.update(1)
            if r.step % cfg.train.log_every == 0 or r.step == cfg.train.steps:
                lr = r.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                accelerator.log({"loss": loss, "lr": lr, "skipped": float(skipped)}, step=r.step)
            if r.sampler and cfg.sample.every and r.step % cfg.sample.every == 0:
                with (
                    r.ema.applied() if r.ema else contextlib.nullcontext(),
                    r.phases.phase(SAMPLES),
                ):
                    grid = r.sampler.at_step(accelerator.unwrap_model(r.transformer), r.step)
                _log_image(accelerator, grid, r.step)
            if cfg.validation.every and r.step % cfg.validation.every == 0:
                validate(r)
            stopping = _any_rank(accelerator, stop.signum != 0)
            due = (
                cfg.checkpoint.every
                and r.step % cfg.checkpoint.every == 0
                and r.step < cfg.train.steps
            )
            if due or stopping:
                saved = checkpoints.save(accelerator, r.out, r.step, cfg.checkpoint.keep_last)
                if stopping:
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, saved)
    finally:
        bar.close()
        stop.restore()
    return time.perf_counter() - loop_start, step_seconds


def optimizer_step(r: Run, plan: BatchPlan, step: int) -> tuple[float, bool]:
    """The micro-batches of one optimizer step: -> (mean loss, whether a non-finite loss skipped the step)."""
    cfg, accelerator = r.cfg, r.accelerator
    accum = cfg.train.gradient_accumulation
    step_loss, skipped = 0.0, False
    for micro in range(step * accum, (step + 1) * accum):
        indices = plan.micro_batch(micro)
        generator = step_generator(cfg.train.seed, plan.global_number(micro))
        if cfg.lora.dropout > 0:  # LoRA dropout draws from the global RNG; reseeding costs ~0.8 ms
            torch.manual_seed(generator.initial_seed())
        with accelerator.accumulate(r.transformer):
            with accelerator.autocast():
                loss = micro_batch_loss(r.transformer, r.plain, r.batches, indices, generator)
            if _any_rank(accelerator, not torch.isfinite(loss).item()):
                skipped = True
                _report_nonfinite(
                    cfg.train.nonfinite, step, [str(r.data.samples[i].path) for i in indices]
                )
            if not skipped:
                accelerator.backward(loss)  # accelerate divides by the accumulation steps
                step_loss += loss.detach().item() / accum
            if accelerator.sync_gradients and not skipped:
                if cfg.train.max_grad_norm > 0:
                    # DDP gradients are already reduced here, so torch's clip is exact; accelerate's
                    # wrapper re-checks installed packages every call (~0.5 ms, 4% of a tiny step)
                    accelerator.unscale_gradients()  # fp16 GradScaler only; a no-op otherwise
                    torch.nn.utils.clip_grad_norm_(r.trainable, cfg.train.max_grad_norm)
                r.optimizer.step()
                if r.ema:
                    r.ema.update()
            if accelerator.sync_gradients:
                r.optimizer.zero_grad(set_to_none=True)
    return step_loss, skipped


# ---- finish ------------------------------------------------------------------------------------------------
def finish(r: Run) -> None:
    cfg, accelerator = r.cfg, r.accelerator
    final = accelerator.unwrap_model(r.transformer)
    layers = r.shards.lora_state(final)  # sharded: gathered whole on every rank
    _check_ranks_agree(accelerator, final, layers)
    if cfg.validation.enabled and (not r.validation or r.validation[-1][0] != r.step):
        validate(r)
    if accelerator.is_main_process:
        with r.phases.phase(SAVE):
            save_lora(r.out / WEIGHT_NAME, final, r.base.family, r.lora_info(), layers=layers)
            export_copies(r.out, cfg.output.export, r.base.path)
    with r.ema.applied() if r.ema else contextlib.nullcontext():
        if r.ema and accelerator.is_main_process:
            save_lora(
                r.out / EMA_WEIGHT_NAME,
                final,
                r.base.family,
                r.lora_info() | {"ema_decay": r.ema.decay},
            )
        if r.sampler and cfg.sample.before_after:
            r.sampler.before_after(final, r.step)
    if accelerator.is_main_process:
        variant = r.base.family.variant(final.config)
        write_card(
            r.out,
            model_card(
                name=cfg.output.name or r.out.resolve().name,
                variant=variant,
                family=r.base.family,
                base_model=card_base_model(r.base, variant),
                load_from=r.base.path,
                trigger=cfg.data.trigger,
                rank=cfg.lora.rank,
                alpha=cfg.lora.alpha,
                steps=cfg.train.steps,
                dataset_size=r.data.subject_count,
                resolution=", ".join(map(str, cfg.train.resolutions)),
                targets=cfg.lora.targets,
            ),
        )
    accelerator.end_training()


def validate(r: Run) -> None:
    """The held-out loss now: logged, and written as validation.csv / validation.png."""
    loss = validation_loss(
        r.accelerator.unwrap_model(r.transformer),
        r.batches,
        r.data.validation_indices,
        r.cfg.validation.sigmas,
    )
    r.validation.append((r.step, loss))
    r.accelerator.log({"validation_loss": loss}, step=r.step)
    if r.accelerator.is_main_process:
        write_curve(r.out, r.validation)


def _check_ranks_agree(
    accelerator, model: torch.nn.Module, layers: dict[str, torch.Tensor] | None
) -> None:
    """Data-parallel ranks must hold the same LoRA; a silent divergence would ship rank 0's guess. Sharded, each
    rank checks the whole LoRA it gathered (what rank 0 writes)."""
    if accelerator.num_processes == 1:
        return
    tensors = layers.values() if layers is not None else trainable_parameters(model)
    checksum = torch.stack([t.detach().double().sum() for t in tensors]).sum().view(1)
    gathered = accelerator.gather(checksum.to(accelerator.device))
    if not torch.all(gathered == gathered[0]):
        odd = [str(i) for i, c in enumerate(gathered.tolist()) if c != gathered[0].item()]
        raise RuntimeError(
            f"rank(s) {', '.join(odd)} ended with LoRA weights that differ from rank 0's (checksums "
            f"{gathered.tolist()}); rank 0's would have been saved, so nothing was"
        )
    log.info(
        "all %d ranks hold identical LoRA weights (checksum %.10g)",
        accelerator.num_processes,
        gathered[0].item(),
    )


def _log_image(accelerator, image, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_images({"samples": [image]}, step=step)


def _any_rank(accelerator, flag: bool) -> bool:
    """True when `flag` holds on any process (one tiny all-reduce; free in a single process)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _report_nonfinite(policy: str, step: int, files: list[str]) -> None:
    message = f"non-finite loss at step {step + 1} on {', '.join(files)}"
    if policy == "stop":
        raise UserError(
            message + "; check these images, lower optim.lr, or set train.nonfinite: skip"
        )
    log.warning(message + "; batch skipped (train.nonfinite: skip)")


def _flat(cfg: Config) -> dict:
    flat = {}
    for section, values in to_dict(cfg).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    # trackers (tensorboard hparams) take scalars only
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
