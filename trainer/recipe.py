"""The training recipe. Reads top to bottom: setup, train, save."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data_tools.atomic import write_text
from data_tools.dataset import load_samples
from data_tools.errors import UserError
from inference.loading import DTYPES, apply_memory_options, load_pipeline, resolve_base_model
from inference.lora_io import WEIGHT_NAME, save_lora
from inference.training_samples import SampleRenderer
from trainer import checkpoints
from trainer.batches import BatchPlan
from trainer.cache import build_features
from trainer.config import Config, dump_config
from trainer.lora import add_lora, trainable_parameters
from trainer.optim import build_optimizer, build_scheduler
from trainer.outputs import model_card, prepare_output_dir, write_card
from trainer.step import micro_batch_loss, step_generator

log = logging.getLogger("flux2_lora.train")


@dataclasses.dataclass
class TrainResult:
    lora_path: Path
    transformer: torch.nn.Module  # the trained transformer with its LoRA, for callers that keep going in-process
    text_encoder_calls: int
    vae_calls: int
    loop_seconds: float  # wall time of the training loop alone (no loading, caching or saving)
    step_seconds: list[float]  # wall time of each optimizer step (checkpoints and samples included)


class TrainingInterrupted(Exception):
    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved at '{checkpoint}' "
                         "(continue with resume=latest)")
        self.signum = signum


class StopRequest:
    """SIGTERM/SIGINT only raise a flag; the loop saves a checkpoint at the next step boundary."""

    def __init__(self):
        self.signum = 0
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, _frame):
        self.signum = signum

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def run(cfg: Config, show_progress: bool = True) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    # ---- setup: everything a user can get wrong fails here, before any weights load ---------------------
    base = resolve_base_model(cfg.model)
    samples = load_samples(cfg.data, cfg.train.resolution)
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    out = Path(cfg.output.dir)
    AcceleratorState._reset_state()  # a second run in one process may use other precision settings
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation,
        log_with=None if cfg.output.report_to == "none" else cfg.output.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if accelerator.is_main_process:
        prepare_output_dir(cfg.output, resuming=cfg.resume is not None)
    accelerator.wait_for_everyone()
    resume_from = checkpoints.resolve_resume(cfg.resume, out) if cfg.resume else None

    with accelerator.main_process_first():  # rank 0 fills the cache, the others then read it
        features = build_features(samples, base, cfg.model.dtype, cfg.cache,
                                  show_progress and accelerator.is_main_process, accelerator.device,
                                  extra_prompts=tuple(cfg.sample.prompts))
    log.info("encoders called: text %d, vae %d", features.text_encoder_calls, features.vae_calls)

    transformer = load_pipeline(base, cfg.model.dtype, text_encoder=False, vae=False).transformer
    add_lora(transformer, cfg.lora, cfg.train.seed)
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    apply_memory_options(transformer, cfg.model, accelerator.device)
    transformer.train()
    trainable = trainable_parameters(transformer)  # listed once: walking every module each step costs ~1 ms
    optimizer = build_optimizer(trainable, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    # group offloading moves weights itself; accelerate must not move the whole model to the device
    placement = [cfg.model.group_offload == "none", True]
    transformer, optimizer = accelerator.prepare(transformer, optimizer, device_placement=placement)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per optimizer step

    def lora_info() -> dict:
        return {"family": base.family.name, "base_model": base.path, "trigger": cfg.data.trigger or "",
                "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": cfg.lora.targets}

    def save_hook(models, weights, output_dir):  # LoRA weights only, never the frozen base
        if accelerator.is_main_process:
            save_lora(Path(output_dir) / WEIGHT_NAME, accelerator.unwrap_model(models[0]), base.family, lora_info())
        weights.clear()

    def load_hook(models, input_dir):
        from peft import set_peft_model_state_dict

        from inference.lora_io import load_state

        state = {k.removeprefix("transformer."): v for k, v in load_state(Path(input_dir) / WEIGHT_NAME).items()}
        result = set_peft_model_state_dict(accelerator.unwrap_model(models.pop()), state)
        if result.unexpected_keys:
            raise UserError(f"checkpoint '{input_dir}' holds a LoRA of another shape; resume it with its own lora settings")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    start = 0
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"checkpoint '{resume_from}' does not fit this config ({str(exc).splitlines()[0][:160]}); "
                            "resume with the config it was saved with") from None
        start = checkpoints.read_state(resume_from)["step"]
    sampler = None
    if cfg.sample.prompts and accelerator.is_main_process:
        sampler = SampleRenderer(base, cfg.model.dtype, cfg.sample, features.embeds, cfg.train.resolution, out)
    if accelerator.is_main_process:
        write_text(out / "config.yaml", dump_config(cfg))
    if cfg.output.report_to != "none":
        accelerator.init_trackers(cfg.output.project, config=_flat(cfg),
                                  init_kwargs={"wandb": {"dir": str(out), "name": cfg.output.name or out.name}})

    # ---- train -------------------------------------------------------------------------------------------
    # a batch shares one position-id layout: the same bucket and the same reference sizes
    layouts = [(s.bucket, tuple(tuple(r.shape) for r in refs)) for s, refs in zip(samples, features.references)]
    plan = BatchPlan(layouts, cfg.train.batch_size, cfg.train.seed,
                     accelerator.num_processes, accelerator.process_index)
    captions = [s.caption for s in samples]
    dtype = DTYPES[cfg.model.dtype]
    accum = cfg.train.gradient_accumulation
    stop = StopRequest()
    bar = tqdm(total=cfg.train.steps, initial=start, desc="training", dynamic_ncols=True,
               disable=not (show_progress and accelerator.is_main_process))
    loop_start = time.perf_counter()
    step_seconds = []
    try:
        for step in range(start, cfg.train.steps):
            step_start = time.perf_counter()
            step_loss, skipped = 0.0, False
            for micro in range(step * accum, (step + 1) * accum):
                indices = plan.micro_batch(micro)
                generator = step_generator(cfg.train.seed, micro, accelerator.process_index)
                if cfg.lora.dropout > 0:  # LoRA dropout draws from the global RNG; reseeding costs ~0.8 ms
                    torch.manual_seed(generator.initial_seed())
                with accelerator.accumulate(transformer):
                    with accelerator.autocast():
                        loss = micro_batch_loss(transformer, base.family, features, captions, indices, cfg.train,
                                                cfg.flow, generator, dtype, accelerator.device)
                    if _any_rank(accelerator, not torch.isfinite(loss).item()):
                        skipped = True
                        _report_nonfinite(cfg.train.nonfinite, step, [str(samples[i].path) for i in indices])
                    if not skipped:
                        accelerator.backward(loss)  # accelerate divides by the accumulation steps
                        step_loss += loss.detach().item() / accum
                    if accelerator.sync_gradients and not skipped:
                        if cfg.train.max_grad_norm > 0:
                            # DDP gradients are already reduced here, so torch's clip is exact; accelerate's
                            # wrapper re-checks installed packages every call (~0.5 ms, 4% of a tiny step)
                            accelerator.unscale_gradients()  # fp16 GradScaler only; a no-op otherwise
                            torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
                        optimizer.step()
                    if accelerator.sync_gradients:
                        optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step_seconds.append(time.perf_counter() - step_start)
            bar.update(1)
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                accelerator.log({"loss": step_loss, "lr": lr, "skipped": float(skipped)}, step=step + 1)
            if sampler and cfg.sample.every and (step + 1) % cfg.sample.every == 0:
                grid = sampler.at_step(accelerator.unwrap_model(transformer), step + 1)
                _log_image(accelerator, grid, step + 1)
            stopping = _any_rank(accelerator, stop.signum != 0)
            due = cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < cfg.train.steps
            if due or stopping:
                saved = checkpoints.save(accelerator, out, step + 1, cfg.checkpoint.keep_last)
                if stopping:
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, saved)
    finally:
        bar.close()
        stop.restore()
    loop_seconds = time.perf_counter() - loop_start

    # ---- save --------------------------------------------------------------------------------------------
    final = accelerator.unwrap_model(transformer)
    _check_ranks_agree(accelerator, final)
    if accelerator.is_main_process:
        save_lora(out / WEIGHT_NAME, final, base.family, lora_info() | {"steps": cfg.train.steps})
        if sampler and cfg.sample.before_after:
            sampler.before_after(final)
        variant = base.family.variant(final.config)
        # a hub id names the exact base (klein base vs distilled share sizes); a local folder is named by its size
        card_base = variant.hub_id(base.distilled) if base.is_local else base.path
        write_card(out, model_card(name=cfg.output.name or out.resolve().name, variant=variant, family=base.family,
                                   base_model=card_base,
                                   trigger=cfg.data.trigger, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                                   steps=cfg.train.steps, dataset_size=len(samples) // cfg.data.repeats,
                                   resolution=cfg.train.resolution, targets=cfg.lora.targets))
    accelerator.end_training()
    return TrainResult(out / WEIGHT_NAME, final, features.text_encoder_calls, features.vae_calls, loop_seconds,
                       step_seconds)


def _check_ranks_agree(accelerator, model: torch.nn.Module) -> None:
    """Data-parallel ranks must hold the same LoRA; a silent divergence would ship rank 0's guess."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in trainable_parameters(model)]).sum().view(1)
    gathered = accelerator.gather(checksum.to(accelerator.device))
    if not torch.all(gathered == gathered[0]):
        raise RuntimeError(f"LoRA weights differ between ranks: {gathered.tolist()}")
    log.info("all %d ranks hold identical LoRA weights (checksum %.10g)", accelerator.num_processes, gathered[0].item())


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
        raise UserError(message + "; check these images, lower optim.lr, or set train.nonfinite: skip")
    log.warning(message + "; batch skipped (train.nonfinite: skip)")


def _flat(cfg: Config) -> dict:
    from data_tools.configtree import to_dict

    flat = {}
    for section, values in to_dict(cfg).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    # trackers (tensorboard hparams) take scalars only
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
