"""The adapter kinds (lora, dora, lokr, loha): one entry per kind, as peft's register_peft_method keeps one per
method. An entry says how the kind wraps a module (its peft config), which tensors it saves per module, what it
costs to train, what loads it and which export layouts carry it; config, training, the planner, loading and export
ask the entry and never branch on a kind's name. Adding a kind is one `register` call here (plus, for a new tensor
layout, its exact conversion in lora_formats)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

EXPORT_FORMATS = ("diffusers", "comfyui", "kohya", "bfl")


@dataclasses.dataclass(frozen=True)
class AdapterKind:
    name: str
    help: str
    # peft's config class and the arguments it takes beyond the targets: fn(rank, alpha, dropout) -> kwargs
    peft_class: str
    peft_arguments: Callable[[int, float, float], dict]
    # the tensor names peft saves beside each wrapped module (LyCORIS factors, or lora_A / lora_B)
    factors: tuple[str, ...]
    # one learned magnitude per output row (DoRA): export needs the base weights to write ComfyUI's dora_scale
    magnitudes: bool = False
    # dense float32 temporaries in training, in units of the largest wrapped weight (the planner counts them)
    dense_temporaries: float = 0.0
    has_dropout: bool = True
    # peft wraps quantised Linear layers (bitsandbytes / torchao) for this kind
    quantizable: bool = True
    # stock diffusers' load_lora_weights reads our file (else flux2-lora injects it through peft_class)
    stock_diffusers: bool = True
    # export layouts that cannot carry this kind, with the reason shown to the user
    refused_layouts: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def lycoris(self) -> bool:
        """Factors other than a lora_A / lora_B pair: written to ComfyUI in the LyCORIS layout and made an exact
        plain LoRA for the tools that read only that."""
        return self.factors != LORA_FACTORS

    def trainable_parameters(self, shapes, rank: int) -> int:
        """Trainable parameters of this kind at `rank` over wrapped Linear layers of `shapes` ((in, out) each)."""
        return sum(_layer_parameters(self.name, i, o, rank) for i, o in shapes)

    def peft_config(self, rank: int, alpha: float, dropout: float, targets):
        import peft

        return getattr(peft, self.peft_class)(
            target_modules=targets, **self.peft_arguments(rank, alpha, dropout)
        )

    def needs_base(self, fmt: str) -> bool:
        """Whether writing `fmt` reads the base model's weights: magnitudes become ComfyUI's dora_scale in every
        layout but diffusers (and the ones that refuse the kind)."""
        return self.magnitudes and fmt != "diffusers" and fmt not in self.refused_layouts

    def export_problem(self, fmt: str, has_base: bool = True) -> str | None:
        """Why this kind cannot be written as `fmt`, or None. `has_base`: whether the base model's weights can be
        read (see needs_base)."""
        if fmt in self.refused_layouts:
            return self.refused_layouts[fmt]
        if self.needs_base(fmt) and not has_base:
            return (
                f"a {self.name} adapter exports as {fmt} only with its base model's weights (ComfyUI scales each "
                "output row by dora_scale / |W|, computed from them); add --model PATH, the model it was trained on"
            )
        return None


LORA_FACTORS = ("lora_A", "lora_B")
KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    if kind.name in KINDS:
        raise ValueError(f"adapter kind {kind.name!r} is registered twice")
    KINDS[kind.name] = kind
    return kind


def kind_of(name: str) -> AdapterKind:
    """The registered kind `name` (a file's header or lora.type); unknown names read as plain LoRA, the layout every
    other tool writes."""
    return KINDS.get(name, KINDS["lora"])


def _lora_arguments(use_dora: bool):
    return lambda rank, alpha, dropout: {
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "init_lora_weights": True,
        "use_dora": use_dora,
    }


def _lycoris_arguments(rank: int, alpha: float, dropout: float) -> dict:
    return {"r": rank, "alpha": alpha}


_LYCORIS_QUANTIZED = "wraps plain Linear layers only (peft's LyCORIS layers)"

register(
    AdapterKind(
        name="lora",
        help="lora",
        peft_class="LoraConfig",
        peft_arguments=_lora_arguments(use_dora=False),
        factors=LORA_FACTORS,
    )
)
register(
    AdapterKind(
        name="dora",
        help="dora (weight-decomposed LoRA: a learned magnitude per output, often better likeness)",
        peft_class="LoraConfig",
        peft_arguments=_lora_arguments(use_dora=True),
        factors=LORA_FACTORS,
        magnitudes=True,
        # peft builds dense tensors the size of each wrapped weight (B @ A, W + s B A, their norm) in forward and
        # backward, one layer at a time: measured on CPU slices at klein-4B's width, 3.6-3.75 x the largest
        # wrapped weight in float32 above the same LoRA, whatever the depth and token count (benchmarks/memory.py)
        dense_temporaries=3.7,
        refused_layouts={
            "kohya": "a dora adapter cannot be exported as kohya: musubi-tuner and kohya apply no DoRA magnitudes "
            "(they would load it as a plain LoRA); export it as comfyui (ComfyUI applies them) or diffusers, or "
            "train lora.type: lora"
        },
    )
)
register(
    AdapterKind(
        name="lokr",
        help="lokr (LyCORIS Kronecker product, through peft)",
        peft_class="LoKrConfig",
        peft_arguments=_lycoris_arguments,
        factors=("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
        has_dropout=False,
        quantizable=False,
    )
)
register(
    AdapterKind(
        name="loha",
        help="loha (LyCORIS Hadamard product, through peft; stock diffusers' load_lora_weights refuses it, "
        "flux2-lora loads it)",
        peft_class="LoHaConfig",
        peft_arguments=_lycoris_arguments,
        factors=("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
        has_dropout=False,
        quantizable=False,
        stock_diffusers=False,
    )
)


def quantize_problem(kind: AdapterKind, quantize: str) -> str | None:
    if quantize == "none" or kind.quantizable:
        return None
    return (
        f"lora.type: {kind.name} {_LYCORIS_QUANTIZED} and model.quantize: {quantize} replaces them; use a "
        f"lora.type of {', '.join(k for k, v in KINDS.items() if v.quantizable)}, or model.quantize: none"
    )


# a LoRA pair's names in peft / diffusers files and in kohya-style ones
PAIR_NAMES = (*LORA_FACTORS, "lora_down", "lora_up")


def factor_names() -> tuple[str, ...]:
    """Every tensor name an adapter file keeps beside a module, over the registered kinds and both pair namings."""
    return tuple(dict.fromkeys([*PAIR_NAMES, *(f for k in KINDS.values() for f in k.factors)]))


@functools.cache
def _layer_parameters(name: str, in_features: int, out_features: int, rank: int) -> int:
    """What peft really builds for one layer, counted on the meta device (no memory): exact for every kind,
    including LoKr's factorisation of each side, which a per-rank formula gets wrong."""
    import torch
    from peft import inject_adapter_in_model

    with torch.device("meta"):
        layer = torch.nn.Sequential(torch.nn.Linear(in_features, out_features))
        wrapped = inject_adapter_in_model(KINDS[name].peft_config(rank, rank, 0.0, ["0"]), layer)
    return sum(p.numel() for n, p in wrapped.named_parameters() if "base_layer" not in n)


def module_of(key: str) -> str | None:
    """The module a saved adapter tensor belongs to (`transformer.x.y.lora_A.weight` -> `transformer.x.y`), or
    None for a key that is no adapter factor (alpha, magnitudes, scales)."""
    module, _, factor = key.removesuffix(".weight").rpartition(".")
    return module if factor in factor_names() else None
