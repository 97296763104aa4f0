"""The memory planner: will this config fit the GPU and RAM it is given, phase by phase, before any weight loads?

It builds the real architectures on the meta device from their config.json (shipped for the known FLUX.2
checkpoints: inference/architectures), counts every parameter exactly, and adds up, per phase:
- weights: bytes per parameter after quantisation (inference/quantize.py, the loaders' own rule), divided by the
  processes under FSDP, or one block on the GPU under group offload;
- LoRA parameters, gradients and optimizer state (float32; 8-bit states for adamw8bit);
- activations: ACTIVATION coefficients, in units of (tokens x hidden x activation bytes) per block, measured on
  CPU slices of the real widths (benchmarks/memory.py) and checked against a measured step in
  tests/test_memory.py;
- the text encoder and VAE while the cache fills, each loaded only then and freed after.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

from common.configtree import option, positive
from common.limits import SIDE_MULTIPLE
from common.machine import detected_ram
from inference.adapter_kinds import KINDS
from trainer.phases import LOAD, SAMPLES, STEP, TEXT_ENCODER, VAE

GIB = 1024**3
# one extra shard being read while a model loads straight to its device; diffusers' default max_shard_size
DEFAULT_SHARD_GIB = 10.0
CUDA_CONTEXT_GIB = 0.75  # CUDA context, cuBLAS workspace and allocator slack on a fresh process
# the caching allocator's blocks round up: plan 5 % above the tensors' own bytes
FRAGMENTATION = 1.05
PROCESS_RAM_GIB = 3.0  # Python, torch, CUDA libraries and the dataset in host RAM
# the same without CUDA's libraries, measured as the rehearsal's resident size before its first phase
PROCESS_RAM_CPU_GIB = 1.5
# the pipelines pad every prompt to 512 tokens, and the transformer attends to all of them
TEXT_TOKENS = 512
# when the VAE's config is not at hand (hub ids): FLUX.2's AutoencoderKLFlux2
VAE_PARAMS = 84_000_000
# activation values per pixel of a VAE encode or decode at full resolution (no grad): measured on FLUX.2's VAE in
# bf16 on the CPU, 640 encoding and 769 decoding, at 256 and 512 px alike
VAE_ACTIVATIONS = 800

# Activations per token per block, in units of hidden x activation-bytes, measured on CPU at klein-4B's width
# with bf16 autocast and a rank-16 LoRA (benchmarks/memory.py compares them with a measured step at each real width).
# saved: kept for backward without checkpointing; transient: the extra at the worst moment of backward;
# recompute: one checkpointed block recomputed in backward (its saved tensors and transient together).
ACTIVATION = {
    "double": {
        "saved": {"attention": 23.8, "attention_mlp": 28.5, "all_linear": 28.5},
        "transient": 9.5,
        "recompute": {"attention": 25.8, "attention_mlp": 29.3, "all_linear": 29.3},
    },
    "single": {
        "saved": {"attention": 25.8, "attention_mlp": 25.8, "all_linear": 25.8},
        "transient": 19.5,
        "recompute": {"attention": 30.3, "attention_mlp": 30.3, "all_linear": 30.3},
    },
}
CHECKPOINT_INPUT = 1.0  # a checkpointed block keeps only its input
OUTSIDE_BLOCKS = 1.0  # embedders, modulation and the final layer's saved tensors

OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}  # per trainable parameter


@dataclasses.dataclass
class MemoryConfig:
    check: bool = option(
        True,
        help="plan GPU memory and RAM before loading weights and refuse a config that "
        "cannot fit (train.py --skip-memory-check turns it off)",
    )
    gpu_memory: float | None = option(
        None,
        check=positive,
        help="GiB of GPU memory to plan for (per GPU); "
        "default: the detected GPU, no check without one",
    )
    ram: float | None = option(
        None, check=positive, help="GiB of host RAM to plan for; default: this machine's"
    )
    gpus: int | None = option(
        None,
        check=positive,
        help="GPUs (processes) the run is launched on, for planning outside a launch "
        "(`flux2-lora plan`); a launched run counts its own processes",
    )


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    gpu: float  # bytes on each GPU
    ram: float  # bytes of host RAM
    parts: dict[str, float]  # what makes up the GPU figure (bytes)


@dataclasses.dataclass(frozen=True)
class Plan:
    label: str
    phases: list[Phase]
    gpu_memory: float | None  # GiB of each GPU planned for (None: no GPU given or detected)
    ram: float | None  # GiB of host RAM of the machine (all its processes together)
    processes: int
    notes: list[str]
    sharded: bool = False  # FSDP over the processes
    # bytes of each phase's RAM that are the processes themselves, not tensors
    process_ram: float = 0.0
    device: str = "cuda"  # "cpu": a CPU run, whose tensors are all RAM

    @property
    def peak_gpu(self) -> float:
        return max(p.gpu for p in self.phases)

    @property
    def peak_ram(self) -> float:
        return max(p.ram for p in self.phases)

    def fits(self) -> bool:
        gpu_ok = self.gpu_memory is None or self.peak_gpu / GIB <= self.gpu_memory
        ram_ok = self.ram is None or self.peak_ram / GIB <= self.ram
        return gpu_ok and ram_ok

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.label,
            "processes": self.processes,
            "peak_gpu_gib": round(self.peak_gpu / GIB, 2),
            "peak_ram_gib": round(self.peak_ram / GIB, 2),
            "gpu_memory_gib": self.gpu_memory,
            "ram_gib": self.ram,
            "fits": self.fits(),
            "notes": self.notes,
            "phases": [
                {
                    "name": p.name,
                    "gpu_gib": round(p.gpu / GIB, 2),
                    "ram_gib": round(p.ram / GIB, 2),
                    "gpu_parts_gib": {k: round(v / GIB, 3) for k, v in p.parts.items()},
                }
                for p in self.phases
            ],
        }


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a transformer, counted on its meta-device build."""

    params: int
    hidden: int
    double_blocks: int
    single_blocks: int
    # quantisation -> bytes of all weights (the rest at the compute dtype)
    weight_bytes: dict[str, int]
    largest_block: dict[str, int]  # quantisation -> bytes of the largest block
    # bytes of the largest block's Linear weights at the compute dtype
    largest_block_linear_full: int
    linear_full: int  # bytes at the compute dtype of the Linear weights a backward pass reads
    lora_params: int
    # weights of the largest Linear in the blocks (nf4 dequantises one at a time)
    largest_linear: int = 0
    # weights of the largest Linear the adapter wraps (DoRA's dense temporaries)
    largest_adapted: int = 0
    text_width: int = 0  # the prompt embeddings' width (joint_attention_dim)


def transformer_shape(
    transformer,
    dtype_bytes: int,
    lora_rank: int,
    lora_kind: str,
    targets: str,
    keep_full: tuple[str, ...] | None = None,
) -> ModelShape:
    """`keep_full`: Linear layers left unquantised (default: FLUX.2's, inference/quantize.py)."""
    import torch

    from inference.quantize import TRANSFORMER_KEEP_FULL, quantized_bytes
    from trainer.lora import targeted_layers

    keep = TRANSFORMER_KEEP_FULL if keep_full is None else keep_full
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    kinds = ("none", "fp8", "int8", "nf4")
    weight = {k: quantized_bytes(transformer, k, dtype_bytes, keep) for k in kinds}
    largest = {k: max(quantized_bytes(b, k, dtype_bytes, ()) for b in blocks) for k in kinds}
    block_linear = max(
        sum(m.weight.numel() for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in blocks
    )
    # Linear layers whose inputs carry gradients keep their dequantised weight for backward: the blocks' layers,
    # except the first block's input projections (they read the embedders' outputs, which need no gradient); the
    # modulation layers read the timestep embedding, which needs none either.
    first_inputs = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    linear_full = sum(
        m.weight.numel()
        for i, b in enumerate(blocks)
        for n, m in b.named_modules()
        if isinstance(m, torch.nn.Linear) and not (i == 0 and n.split(".")[-1] in first_inputs)
    )
    layers = targeted_layers(transformer, targets)
    lora = KINDS[lora_kind].trainable_parameters(
        [(m.in_features, m.out_features) for m in layers.values()], lora_rank
    )
    config = transformer.config
    return ModelShape(
        params=sum(p.numel() for p in transformer.parameters()),
        hidden=config.num_attention_heads * config.attention_head_dim,
        double_blocks=len(transformer.transformer_blocks),
        single_blocks=len(transformer.single_transformer_blocks),
        weight_bytes=weight,
        largest_block=largest,
        largest_block_linear_full=block_linear * dtype_bytes,
        linear_full=linear_full * dtype_bytes,
        lora_params=lora,
        largest_linear=max(
            m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)
        ),
        largest_adapted=max((m.weight.numel() for m in layers.values()), default=0),
        text_width=config.joint_attention_dim,
    )


def activation_bytes(
    shape: ModelShape,
    tokens: int,
    batch: int,
    act_bytes: int,
    checkpointing: bool,
    targets: str,
    graphs: int = 1,
) -> float:
    """Peak activation memory of one training micro-batch (forward + backward), the LoRA gradients excluded.
    `graphs`: forwards whose graphs stay alive until the backward (2 with regularization.preserve: the batch
    with its caption and with the class prompt)."""
    unit = batch * tokens * shape.hidden * act_bytes
    kinds = [("double", shape.double_blocks), ("single", shape.single_blocks)]
    present = [k for k, n in kinds if n]
    if checkpointing:
        held = (shape.double_blocks + shape.single_blocks) * CHECKPOINT_INPUT
        return unit * (
            (held + OUTSIDE_BLOCKS) * graphs
            + max(ACTIVATION[k]["recompute"][targets] for k in present)
        )
    saved = sum(n * ACTIVATION[k]["saved"][targets] for k, n in kinds)
    return unit * (
        (saved + OUTSIDE_BLOCKS) * graphs + max(ACTIVATION[k]["transient"] for k in present)
    )


def transient_weights(shape: ModelShape, quantize: str, lora_kind: str) -> dict[str, float]:
    """Weight-sized temporaries of one layer at a time: nf4's dequantised bf16 copy of the layer it runs
    (bitsandbytes), an adapter kind's dense float32 tensors (DoRA's)."""
    parts = {}
    if quantize == "nf4":
        parts["nf4 dequantised layer"] = shape.largest_linear * 2.0
    if temporaries := KINDS[lora_kind].dense_temporaries:
        parts[f"{lora_kind} temporaries"] = shape.largest_adapted * 4.0 * temporaries
    return parts


# Bytes kept per dequantised weight byte (bf16), measured on CPU slices (benchmarks/memory.py): torchao's float8
# weight-only layers keep more than one bf16 copy in backward; int8's keep exactly one.
DEQUANTIZED = {"int8": {"saved": 1.0, "recompute": 1.0}, "fp8": {"saved": 1.31, "recompute": 1.56}}


def dequantized_copies(shape: ModelShape, quantize: str, checkpointing: bool) -> float:
    """torchao weight-only Linear layers keep each dequantised weight for backward (measured: they raise the peak
    without checkpointing); with checkpointing only the block being recomputed holds them. nf4 does not."""
    if quantize not in DEQUANTIZED:
        return 0.0
    if checkpointing:
        return shape.largest_block_linear_full * DEQUANTIZED[quantize]["recompute"]
    return shape.linear_full * DEQUANTIZED[quantize]["saved"]


def train_step(
    shape: ModelShape,
    *,
    quantize: str,
    tokens: int,
    batch: int,
    act_bytes: int,
    checkpointing: bool,
    targets: str,
    optimizer: str,
    ema: bool = False,
    processes: int = 1,
    offload: str = "none",
    on_gpu: bool = True,
    lora_kind: str = "lora",
    graphs: int = 1,
) -> Phase:
    """GPU memory of a training step. `processes` > 1 shards weights, LoRA and optimizer (FSDP); `offload` keeps
    the frozen weights in RAM with one block (and the next) on the GPU."""
    weights = shape.weight_bytes[quantize]
    if offload != "none":
        # the block in use and the next one being copied
        gpu_weights = 2 * shape.largest_block[quantize]
    elif processes > 1:
        # own shard + gathered blocks
        gpu_weights = weights / processes + 2 * shape.largest_block[quantize]
    else:
        gpu_weights = weights
    trainable = (
        shape.lora_params * (4 + 4 + OPTIMIZER_STATE_BYTES[optimizer] + (4 if ema else 0))
    ) / processes
    parts = {
        "weights": gpu_weights,
        "lora+grads+optimizer": trainable,
        "activations": activation_bytes(
            shape, tokens, batch, act_bytes, checkpointing, targets, graphs
        ),
        "dequantised weights": dequantized_copies(shape, quantize, checkpointing),
        **transient_weights(shape, quantize, lora_kind),
        "context": CUDA_CONTEXT_GIB * GIB if on_gpu else 0.0,
    }
    return Phase(STEP, _device_bytes(parts, on_gpu), 0.0, parts)


def _device_bytes(parts: dict[str, float], on_gpu: bool) -> float:
    """A phase's GPU figure from its parts: the tensors with the allocator's slack, plus the CUDA context."""
    tensors = sum(v for k, v in parts.items() if k != "context")
    return tensors * (FRAGMENTATION if on_gpu else 1.0) + (
        CUDA_CONTEXT_GIB * GIB if on_gpu else 0.0
    )


def _vae_activations(pixels: int, act_bytes: int) -> float:
    return pixels * VAE_ACTIVATIONS * act_bytes


def image_tokens(resolution: int) -> int:
    return (resolution // SIDE_MULTIPLE) ** 2


def text_encoder_bytes(text_encoder, kind: str, dtype_bytes: int) -> tuple[int, int, int, int, int]:
    """(weight bytes after quantisation, hidden size, layers, vocabulary, weights of the largest converted Linear)
    of a text encoder built on the meta device."""
    from inference.quantize import TEXT_ENCODER_KEEP_FULL, largest_converted, quantized_bytes

    config = text_encoder.config
    text = getattr(config, "text_config", None) or config
    return (
        quantized_bytes(text_encoder, kind, dtype_bytes, TEXT_ENCODER_KEEP_FULL),
        text.hidden_size,
        text.num_hidden_layers,
        text.vocab_size,
        largest_converted(text_encoder, TEXT_ENCODER_KEEP_FULL),
    )


def _shard_bytes(base, component: str) -> float:
    """The largest checkpoint shard of a local component (read while loading), else diffusers' default size."""
    from pathlib import Path

    folder = Path(base.path) / component
    if folder.is_dir():
        files = [f.stat().st_size for f in folder.glob("*.safetensors")]
        return float(max(files)) if files else 0.0
    return DEFAULT_SHARD_GIB * GIB


class ModelCounts:
    """A base model's counts on the meta device, per setting (counting takes about a second): one holder serves
    every plan of one base (the cheapest-fix search plans a config a dozen times; the table, hundreds)."""

    def __init__(self, base):
        self.base = base
        self._seen: dict[tuple, Any] = {}

    def _once(self, key: tuple, count):
        if key not in self._seen:
            self._seen[key] = count()
        return self._seen[key]

    def transformer(self, dtype_bytes: int, rank: int, kind: str, targets: str) -> ModelShape:
        return self._once(
            ("transformer", dtype_bytes, rank, kind, targets),
            lambda: transformer_shape(
                self.base.empty_transformer(), dtype_bytes, rank, kind, targets
            ),
        )

    def text_encoder(self, quantize: str, dtype_bytes: int) -> tuple[int, int, int, int, int]:
        return self._once(
            ("text_encoder", quantize, dtype_bytes),
            lambda: text_encoder_bytes(self.base.empty_text_encoder(), quantize, dtype_bytes),
        )

    def vae_params(self) -> int:
        return self._once(("vae",), lambda: _vae_params(self.base))


@dataclasses.dataclass(frozen=True)
class _Setting:
    """What every phase of a plan reads, derived once from the config."""

    cfg: Any
    base: Any
    counts: ModelCounts
    processes: int
    on_gpu: bool
    dtype_bytes: int
    act_bytes: int
    sharded: bool
    process_ram: float  # Python, torch, the libraries and the dataset, per process

    @property
    def context(self) -> float:
        return CUDA_CONTEXT_GIB * GIB if self.on_gpu else 0.0

    def shape(self) -> ModelShape:
        lora = self.cfg.lora
        return self.counts.transformer(self.dtype_bytes, lora.rank, lora.type, lora.targets)

    def phase(self, name: str, parts: dict[str, float], ram: float) -> Phase:
        """A phase from its device parts: on a GPU they are GPU bytes (with the allocator's slack); on the CPU
        they are RAM, beside `ram`."""
        if self.on_gpu:
            return Phase(name, _device_bytes(parts, True), self.process_ram + ram, parts)
        return Phase(name, 0.0, self.process_ram + ram + _device_bytes(parts, False), parts)


def _text_encoder_phase(s: _Setting) -> Phase:
    """The text encoder alone on the cache device, filling the cache. Its language-model head computes logits
    over the whole vocabulary for every token, which encoding never reads (float32: 0.3 GiB for Qwen3)."""
    quantize = s.cfg.model.text_encoder_quantize
    weights, hidden, layers, vocab, largest = s.counts.text_encoder(quantize, s.dtype_bytes)
    parts = {
        "text encoder": weights,
        "activations": (layers + 8) * TEXT_TOKENS * hidden * s.act_bytes,
        "logits": TEXT_TOKENS * vocab * 4.0,
        **_converting(largest, quantize, s.dtype_bytes),
    }
    if s.on_gpu and s.cfg.cache.device == "cpu":  # nothing of it on the GPU; all of it in RAM
        return s.phase(TEXT_ENCODER, dict.fromkeys(parts, 0.0), sum(parts.values()))
    # a CPU run's unquantised weights are its RAM; converted ones are read a shard at a time beside them
    quantized = quantize != "none"
    loading = _shard_bytes(s.base, "text_encoder") if s.on_gpu or quantized else 0.0
    return s.phase(TEXT_ENCODER, parts, loading)


def _converting(largest_linear: int, quantize: str, dtype_bytes: int) -> dict[str, float]:
    """torchao's transient while it converts the largest Linear as the model loads (inference/quantize.py)."""
    from inference.quantize import CONVERT_TEMPORARY

    if quantize not in CONVERT_TEMPORARY:
        return {}
    return {"converting one layer": largest_linear * dtype_bytes * CONVERT_TEMPORARY[quantize]}


def _vae_phase(s: _Setting) -> Phase:
    weights = s.counts.vae_params() * s.dtype_bytes
    activations = _vae_activations(max(s.cfg.train.resolutions) ** 2, s.act_bytes)
    if s.on_gpu and s.cfg.cache.device == "cpu":
        return s.phase(VAE, {"vae": 0.0, "activations": 0.0}, weights + activations)
    return s.phase(VAE, {"vae": weights, "activations": activations}, 0.0)


def _step(s: _Setting) -> Phase:
    cfg, shape = s.cfg, s.shape()
    return train_step(
        shape,
        quantize=cfg.model.quantize,
        tokens=image_tokens(max(cfg.train.resolutions)) + TEXT_TOKENS,
        batch=cfg.train.batch_size,
        act_bytes=s.act_bytes,
        checkpointing=cfg.train.gradient_checkpointing,
        targets=cfg.lora.targets,
        optimizer=cfg.optim.name,
        ema=bool(cfg.ema.decay),
        processes=s.processes if s.sharded else 1,
        offload=cfg.model.group_offload,
        on_gpu=s.on_gpu,
        lora_kind=cfg.lora.type,
        graphs=2 if cfg.regularization.preserve else 1,
    )


def _offloaded(s: _Setting) -> float:
    """Frozen weights group offload keeps in RAM."""
    return (
        s.shape().weight_bytes[s.cfg.model.quantize] if s.cfg.model.group_offload != "none" else 0.0
    )


def _load_phase(s: _Setting, weights: float) -> Phase:
    """Loading the transformer: one checkpoint shard being read, plus the whole model where it is read into RAM
    first (group offload, FSDP before sharding)."""
    quantize = s.cfg.model.quantize
    whole = s.shape().weight_bytes[quantize]
    direct = s.cfg.model.group_offload == "none" and not s.sharded
    shard = _shard_bytes(s.base, "transformer")
    converting = _converting(s.shape().largest_linear, quantize, s.dtype_bytes)
    if not s.on_gpu:  # the model lands in RAM either way; a shard is read on top
        return s.phase(LOAD, {"weights": whole, **converting}, shard)
    return Phase(
        LOAD,
        weights + sum(converting.values()) + s.context,
        s.process_ram + shard + (0.0 if direct else whole),
        {"weights": weights, **converting},
    )


def _image_count(cfg) -> int:
    """Images the run trains on: data.path's, when it is here to count, else the most a LoRA set should hold."""
    from pathlib import Path

    from common.images import IMAGE_EXTENSIONS

    folder = Path(cfg.data.path)
    if folder.is_dir():
        return max(
            1,
            sum(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir()) * cfg.data.repeats,
        )
    return 50


def _features_bytes(s: _Setting) -> float:
    """The cache as the loop holds it in RAM: a latent per image and size, an embedding per caption variant (and
    its class-prompt twin with preservation), the sample prompts and the empty prompt."""
    cfg, shape = s.cfg, s.shape()
    images = _image_count(cfg)
    variants = cfg.data.caption_variants if cfg.data.shuffle_tags or cfg.data.tag_dropout else 1
    captions = (
        images * variants * (2 if cfg.regularization.preserve else 1) + len(cfg.sample.prompts) + 1
    )
    latents = sum(images * image_tokens(r) * 128 for r in cfg.train.resolutions)
    return (captions * TEXT_TOKENS * shape.text_width + latents) * s.dtype_bytes


def _samples_configured(cfg) -> bool:
    return bool(cfg.sample.prompts and (cfg.sample.every or cfg.sample.before_after))


def _step_phase(s: _Setting, step: Phase) -> Phase:
    """The step, with what the run keeps beside it: the cached features in RAM, the sampler's VAE on the device."""
    features = _features_bytes(s)
    parts = dict(step.parts)
    if _samples_configured(s.cfg):
        parts["sample vae"] = s.counts.vae_params() * s.dtype_bytes
    if s.on_gpu:
        return Phase(
            STEP, _device_bytes(parts, True), s.process_ram + _offloaded(s) + features, parts
        )
    return s.phase(STEP, {**parts, "cached features": features}, 0.0)


def _samples_phase(s: _Setting, step: Phase) -> Phase | None:
    """A sample grid mid-run: the training state stays, one denoising forward runs (no graph) and the VAE
    decodes; the adapter's weight-sized temporaries (DoRA) come with every forward."""
    cfg, shape = s.cfg, s.shape()
    if not _samples_configured(cfg):
        return None
    side = max(cfg.train.resolutions)
    width, height = cfg.sample.width or side, cfg.sample.height or side
    unit = (width // SIDE_MULTIPLE) * (height // SIDE_MULTIPLE) + TEXT_TOKENS
    kinds = [k for k, n in (("double", shape.double_blocks), ("single", shape.single_blocks)) if n]
    parts = {
        "weights": step.parts["weights"],
        "lora+grads+optimizer": step.parts["lora+grads+optimizer"],
        "vae": s.counts.vae_params() * s.dtype_bytes,
        "forward": unit
        * shape.hidden
        * s.act_bytes
        * max(ACTIVATION[k]["transient"] for k in kinds),
        **transient_weights(shape, cfg.model.quantize, cfg.lora.type),
        **_forward_dequantised(shape.largest_linear, cfg.model.quantize, s.dtype_bytes),
        "decode": _vae_activations(width * height, s.act_bytes),
        "context": s.context,
    }
    features = _features_bytes(s)
    if s.on_gpu:
        return Phase(
            SAMPLES, _device_bytes(parts, True), s.process_ram + _offloaded(s) + features, parts
        )
    return s.phase(SAMPLES, {**parts, "cached features": features}, 0.0)


def _forward_dequantised(largest_linear: int, quantize: str, dtype_bytes: int) -> dict[str, float]:
    """torchao's dequantised copy of the layer a no-grad forward runs (training's are counted as kept copies)."""
    from inference.quantize import FORWARD_DEQUANTISED

    if quantize not in FORWARD_DEQUANTISED:
        return {}
    return {"dequantised layer": largest_linear * dtype_bytes * FORWARD_DEQUANTISED[quantize]}


def plan_training(
    cfg,
    base,
    processes: int = 1,
    gpu_memory: float | None = None,
    ram: float | None = None,
    on_gpu: bool = True,
    counts: ModelCounts | None = None,
) -> Plan:
    """The memory plan of training config `cfg` on base model `base` (a BaseModel), per GPU of `processes`.
    `on_gpu`: plan a CUDA run (GPU bytes per phase, RAM for what stays on the host); False plans a CPU run, whose
    tensors are all RAM. `counts`: a ModelCounts of `base` to reuse across plans."""
    from inference.loading import DTYPES

    dtype_bytes = DTYPES[cfg.model.dtype].itemsize
    s = _Setting(
        cfg=cfg,
        base=base,
        counts=counts or ModelCounts(base),
        processes=processes,
        on_gpu=on_gpu,
        dtype_bytes=dtype_bytes,
        act_bytes=2 if cfg.train.mixed_precision != "no" or dtype_bytes == 2 else 4,
        sharded=cfg.train.sharding == "fsdp" and processes > 1,
        process_ram=(PROCESS_RAM_GIB if on_gpu else PROCESS_RAM_CPU_GIB) * GIB,
    )
    step = _step(s)
    phases = [
        _text_encoder_phase(s),
        _vae_phase(s),
        _load_phase(s, step.parts["weights"]),
        _step_phase(s, step),
    ]
    if samples := _samples_phase(s, step):
        phases.append(samples)
    # RAM is per machine: every rank fills its share of the cache, then loads and trains
    if processes > 1:
        phases = [dataclasses.replace(p, ram=p.ram * processes) for p in phases]
    notes = []
    if step.parts["dequantised weights"] and not cfg.train.gradient_checkpointing:
        notes.append(
            f"model.quantize: {cfg.model.quantize} without gradient checkpointing keeps every dequantised weight for "
            f"backward (+{step.parts['dequantised weights'] / GIB:.1f} GiB): pair it with "
            "train.gradient_checkpointing: true"
        )
    shape = s.shape()
    label = f"{base.family.variant(base.transformer_config()).name} ({shape.params / 1e9:.2f} B parameters)"
    return Plan(
        label,
        phases,
        gpu_memory if on_gpu else None,
        ram,
        processes,
        notes,
        s.sharded,
        s.process_ram * processes,
        "cuda" if on_gpu else "cpu",
    )


def _vae_params(base) -> int:
    from pathlib import Path

    config = Path(base.path) / "vae" / "config.json"
    if not config.is_file():
        return VAE_PARAMS
    import diffusers
    from accelerate import init_empty_weights

    data = json.loads(config.read_text(encoding="utf-8"))
    with init_empty_weights():
        vae = getattr(diffusers, data.get("_class_name", "AutoencoderKLFlux2")).from_config(data)
    return sum(p.numel() for p in vae.parameters())


def memory_problem(cfg, base, processes: int, device_type: str) -> str | None:
    """train.py's check before loading weights: one line when the plan does not fit the GPU (the detected one, or
    memory.gpu_memory) and the RAM (memory.ram, or this machine's); a CPU run is planned as one, in RAM."""
    if not cfg.memory.check:
        return None
    gpu, ram = planned_for(cfg, device_type)
    # the device the run is on (a CPU run's tensors are all RAM), unless memory.gpu_memory asks about a GPU
    on_gpu = device_type == "cuda" or cfg.memory.gpu_memory is not None
    counts = ModelCounts(base)
    plan = plan_training(cfg, base, processes, gpu, ram, on_gpu=on_gpu, counts=counts)
    if plan.fits():
        return None
    fix = cheapest_fix(cfg, base, processes, gpu, ram, on_gpu=on_gpu, counts=counts)
    return (
        f"memory: {verdict(plan, fix)} (see `flux2-lora plan --config ...`; memory.check=false or "
        "--skip-memory-check trains anyway)"
    )


def planned_for(
    cfg, device_type: str, gpu_memory: float | None = None, ram: float | None = None
) -> tuple[float | None, float]:
    """(GiB of GPU, GiB of RAM) to plan for: the values given, else memory.gpu_memory / memory.ram, else what this
    machine has (no GPU figure off CUDA)."""
    gpu = (
        gpu_memory
        or cfg.memory.gpu_memory
        or (detected_gpu_memory() if device_type == "cuda" else None)
    )
    return gpu, ram or cfg.memory.ram or detected_ram()


def detected_gpu_memory() -> float | None:
    """GiB of the first CUDA GPU, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def render(plan: Plan) -> str:
    """The plan as a table plus its verdict."""
    lines = [
        f"memory plan: {plan.label}, {plan.processes} process{'es' if plan.processes > 1 else ''}",
        "",
        f"{'phase':34s} {'GPU GiB':>8s} {'RAM GiB':>8s}  GPU made of",
    ]
    for p in plan.phases:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in p.parts.items() if v >= 0.05 * GIB)
        lines.append(f"{p.name:34s} {gib(p.gpu):>8s} {gib(p.ram):>8s}  {parts}")
    lines.append(f"{'peak':34s} {gib(plan.peak_gpu):>8s} {gib(plan.peak_ram):>8s}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def verdict(plan: Plan, fix: str | None) -> str:
    ram = f"{plan.ram:.1f} GiB RAM" if plan.ram is not None else "RAM not checked"
    if plan.device == "cpu":
        where = f"a CPU run: peak {gib(plan.peak_ram)} GiB of {ram} (--gpu-memory plans a GPU run)"
        if plan.fits():
            return f"fits {where}"
        return f"does not fit {where}; {fix or 'no listed change makes it fit: lower train.resolution or use more RAM'}"
    card = f"{plan.gpu_memory:.1f} GiB GPU" if plan.gpu_memory is not None else "no GPU given"
    if plan.fits():
        return f"fits: peak {gib(plan.peak_gpu)} GiB GPU of {card.split(' GPU')[0]}, {gib(plan.peak_ram)} GiB of {ram}"
    shard = (
        "shard over more GPUs" if plan.sharded else "shard over several GPUs (train.sharding: fsdp)"
    )
    fix = (
        fix
        or f"no listed change makes it fit: lower train.resolution, {shard}, or use a bigger card or more RAM"
    )
    return (
        f"does not fit: planned peak {gib(plan.peak_gpu)} GiB GPU on a {card}, {gib(plan.peak_ram)} GiB of "
        f"{ram}; {fix}"
    )


# Changes tried when a plan does not fit, cheapest first (quality, then speed): the first that fits is offered,
# naming only what the config does not already set.
FIXES: list[dict[str, Any]] = [
    {"train.gradient_checkpointing": True},
    {"train.batch_size": 1},
    {"model.text_encoder_quantize": "int8"},
    {"cache.device": "cpu"},
    {"model.quantize": "fp8", "train.gradient_checkpointing": True},
    {"optim.name": "adamw8bit"},
    {"model.quantize": "nf4", "train.gradient_checkpointing": True},
    {"model.group_offload": "block", "train.gradient_checkpointing": True},
]
NOTES = {"train.batch_size": "raise train.gradient_accumulation to keep the batch"}


def _changes(cfg, change: dict[str, Any]) -> dict[str, Any]:
    """The part of `change` the config does not already have."""
    return {k: v for k, v in change.items() if _get(cfg, k) != v}


def _label(change: dict[str, Any]) -> str:
    text = ", ".join(
        f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items()
    )
    notes = [NOTES[k] for k in change if k in NOTES]
    return "cheapest fix: " + text + (f" ({'; '.join(notes)})" if notes else "")


def cheapest_fix(
    cfg,
    base,
    processes: int,
    gpu_memory,
    ram,
    on_gpu: bool = True,
    counts: ModelCounts | None = None,
) -> str | None:
    """The cheapest change that makes the plan fit, as "cheapest fix: key=value, ...": the first of FIXES that fits
    alone, else the shortest run of them that fits together, with every change it does not need taken out again.
    A setting the config already has is never offered."""

    from trainer.sharding import sharding_conflict

    counts = counts or ModelCounts(base)

    def fits(changes: dict[str, Any]) -> bool:
        trial = copy.deepcopy(cfg)
        for key, value in changes.items():
            _set(trial, key, value)
        if trial.train.sharding == "fsdp" and sharding_conflict(trial):
            return False  # a change the run would refuse is no fix
        return plan_training(trial, base, processes, gpu_memory, ram, on_gpu, counts).fits()

    useful = [c for c in (_changes(cfg, change) for change in FIXES) if c]
    for change in useful:
        if fits(change):
            return _label(change)
    together: dict[str, Any] = {}
    for change in useful:
        together.update(change)
        if fits(together):
            for key in list(together)[:-1]:  # drop what the last change made unnecessary
                without = {k: v for k, v in together.items() if k != key}
                if fits(without):
                    together = without
            return _label(together)
    if max(cfg.train.resolutions) > 512 and fits({"train.resolution": 512}):
        return "cheapest fix: train.resolution=512"
    return None


def _get(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg, key: str, value) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
