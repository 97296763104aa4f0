"""LoRA files in the layouts other FLUX.2 tools read and write, both ways, exactly.

The one name map between diffusers' module names (ours) and BFL's (the original FLUX.2 code, ComfyUI's
`diffusion_model.*`, ai-toolkit, kohya / musubi-tuner's `lora_unet_*`) lives here. BFL fuses what diffusers keeps
apart: a double block's q, k and v are one `qkv` Linear. A fused LoRA is exact as
    down = cat(A_q, A_k, A_v)            (3r x in)
    up   = block-diagonal(B_q, B_k, B_v) (3d x 3r)
and, reading one back, q, k and v each get the shared down and their rows of up (rank 3r, still exact).
BFL's final adaLN modulation orders its output (shift, scale), diffusers' `norm_out.linear` (scale, shift): the two
halves of lora_B swap on the way out and back.

Layouts:
    diffusers  transformer.<module>.lora_A.weight / lora_B.weight (+ peft metadata)    diffusers, flux2-lora
    bfl        diffusion_model.<bfl>.lora_A.weight / lora_B.weight, no alpha (scale 1) ai-toolkit, ComfyUI
    comfyui    the bfl layout (LoRA), LyCORIS factors (LoKr/LoHa), + dora_scale (DoRA)  ComfyUI
    kohya      lora_unet_<bfl with _>.lora_down.weight / lora_up.weight / .alpha       musubi-tuner, kohya, ComfyUI
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import torch

from common.errors import UserError

FORMATS = ("diffusers", "bfl", "comfyui", "kohya")
Format = Literal["diffusers", "bfl", "comfyui", "kohya"]

_QKV = {"q": 0, "k": 1, "v": 2}
# diffusers module -> BFL module, for the names that are not per-block patterns
_FIXED = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
SWAPPED = "final_layer.adaLN_modulation.1"  # (shift, scale) in BFL, (scale, shift) in diffusers
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}


def bfl_name(module: str) -> tuple[str, int | None]:
    """diffusers module -> (BFL module, its third of a fused qkv or None). KeyError when there is none."""
    if module in _FIXED:
        return _FIXED[module], None
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", module):
        return f"double_blocks.{m[1]}.img_attn.qkv", _QKV[m[2]]
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", module):
        return f"double_blocks.{m[1]}.txt_attn.qkv", _QKV[m[2]]
    if (m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)) and m[2] in _DOUBLE:
        return f"double_blocks.{m[1]}.{_DOUBLE[m[2]]}", None
    if (m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module)) and m[2] in _SINGLE:
        return f"single_blocks.{m[1]}.{_SINGLE[m[2]]}", None
    raise KeyError(module)


def diffusers_names(bfl: str) -> list[str]:
    """BFL module -> its diffusers module(s), in q, k, v order for a fused qkv. KeyError when there is none."""
    fixed = {v: k for k, v in _FIXED.items()}
    if bfl in fixed:
        return [fixed[bfl]]
    if m := re.fullmatch(r"double_blocks\.(\d+)\.(img|txt)_attn\.qkv", bfl):
        names = (
            ("to_q", "to_k", "to_v")
            if m[2] == "img"
            else ("add_q_proj", "add_k_proj", "add_v_proj")
        )
        return [f"transformer_blocks.{m[1]}.attn.{n}" for n in names]
    double = {v: k for k, v in _DOUBLE.items()}
    if (m := re.fullmatch(r"double_blocks\.(\d+)\.(.+)", bfl)) and m[2] in double:
        return [f"transformer_blocks.{m[1]}.{double[m[2]]}"]
    single = {v: k for k, v in _SINGLE.items()}
    if (m := re.fullmatch(r"single_blocks\.(\d+)\.(.+)", bfl)) and m[2] in single:
        return [f"single_transformer_blocks.{m[1]}.{single[m[2]]}"]
    raise KeyError(bfl)


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# ---- out: diffusers pairs -> BFL pairs ------------------------------------------------------------------------
def to_bfl(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{diffusers module: (A, B at scale 1)} -> {BFL module: (down, up)}, fusing q/k/v; unmapped modules are errors."""
    grouped: dict[str, dict[int | None, tuple[torch.Tensor, torch.Tensor]]] = {}
    unmapped = []
    for module, pair in pairs.items():
        try:
            name, part = bfl_name(module)
        except KeyError:
            unmapped.append(module)
            continue
        grouped.setdefault(name, {})[part] = pair
    if unmapped:
        raise UserError(
            f"{len(unmapped)} LoRA module(s) have no BFL name, so the export would drop them "
            f"(e.g. {', '.join(sorted(unmapped)[:3])}); export as diffusers instead"
        )
    out = {}
    for name, parts in grouped.items():
        if None in parts:
            down, up = parts[None]
            out[name] = (down, _swap_halves(up) if name == SWAPPED else up)
            continue
        a0, b0 = next(iter(parts.values()))
        # absent: no change
        thirds = [parts.get(i, (torch.zeros_like(a0), torch.zeros_like(b0))) for i in range(3)]
        out[name] = (torch.cat([a for a, _ in thirds]), torch.block_diag(*[b for _, b in thirds]))
    return out


def write_layout(
    bfl_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    fmt: Format,
    dora_scales: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """{BFL module: (down, up)} -> the tensors of `fmt` (bfl, comfyui or kohya), scale 1 everywhere: kohya names
    carry `.alpha` = rank (musubi-tuner and kohya read it), the BFL names none (no alpha is scale 1 for ComfyUI
    and ai-toolkit, and an `.alpha` key would make stock diffusers refuse the file). `dora_scales`: ComfyUI's
    per-output-row DoRA scale of each BFL module, (out, 1)."""
    tensors = {}
    for name, (down, up) in sorted(bfl_pairs.items()):
        if fmt == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            rank = torch.tensor(float(down.shape[0]))
            tensors.update(
                {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": rank}
            )
        else:
            key = f"diffusion_model.{name}"
            tensors.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
        if dora_scales and name in dora_scales:
            tensors[f"{key}.dora_scale"] = dora_scales[name]
    return {k: v.contiguous() for k, v in tensors.items()}


# ---- in: any layout -> diffusers pairs -------------------------------------------------------------------------
# A key is <module prefix>.<role>: prefixes lora_unet_<BFL with _> (kohya / musubi), diffusion_model.<BFL name>
# (BFL, ComfyUI, ai-toolkit), diffusion_model.<diffusers name> (some tools), transformer.<diffusers name> (our
# LyCORIS q/k/v); roles a LoRA pair (lora_A/lora_down, lora_B/lora_up), alpha, dora_scale, or a LyCORIS factor.
_ROLE = re.compile(
    r"^(?P<prefix>.+?)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha|dora_scale|"
    r"lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b)$"
)
_DOWN, _UP = ("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight")


def _kohya_to_bfl(flat: str) -> str | None:
    """'double_blocks_0_img_attn_qkv' -> 'double_blocks.0.img_attn.qkv', by trying the known BFL names' shapes."""
    m = re.fullmatch(r"(double_blocks|single_blocks)_(\d+)_(.+)", flat)
    if m:
        rest = {
            "img_attn_qkv": "img_attn.qkv",
            "txt_attn_qkv": "txt_attn.qkv",
            "img_attn_proj": "img_attn.proj",
            "txt_attn_proj": "txt_attn.proj",
            "img_mlp_0": "img_mlp.0",
            "img_mlp_2": "img_mlp.2",
            "txt_mlp_0": "txt_mlp.0",
            "txt_mlp_2": "txt_mlp.2",
            "linear1": "linear1",
            "linear2": "linear2",
        }
        return f"{m[1]}.{m[2]}.{rest[m[3]]}" if m[3] in rest else None
    known = {v.replace(".", "_"): v for v in _FIXED.values()}
    return known.get(flat)


def _is_diffusers_module(name: str) -> bool:
    try:
        bfl_name(name)
    except KeyError:
        return False
    return True


def _targets(prefix: str) -> tuple[list[str], bool] | None:
    """A key prefix -> (the diffusers modules it covers, in q/k/v order for a fused qkv; whether it is a BFL name
    whose adaLN halves are swapped), or None when FLUX.2 has no such module."""
    if prefix.startswith("lora_unet_"):
        bfl = _kohya_to_bfl(prefix[len("lora_unet_") :])
    elif prefix.startswith("diffusion_model."):
        bfl = prefix[len("diffusion_model.") :]
        if _is_diffusers_module(bfl):  # a diffusers name under the BFL prefix
            return [bfl], False
    elif prefix.startswith("transformer.") and _is_diffusers_module(prefix[len("transformer.") :]):
        return [prefix[len("transformer.") :]], False
    else:
        return None
    try:
        return (diffusers_names(bfl), bfl == SWAPPED) if bfl else None
    except KeyError:
        return None


def is_foreign(keys, header: dict[str, str] | None = None) -> bool:
    """A file in another tool's layout: BFL or kohya names, or one of our exports (its header says its layout;
    our LyCORIS exports keep q/k/v under diffusers names)."""
    layout = (header or {}).get("flux2_lora.layout", "diffusers")
    return layout != "diffusers" or any(
        k.startswith(("lora_unet_", "diffusion_model.")) for k in keys
    )


def lycoris_scale(factors: dict[str, torch.Tensor], alpha: float | None) -> float:
    """The scale LyCORIS loaders apply to a LoKr / LoHa module: alpha / dim, dim its inner rank (LoKr: w2's, else
    w1's decomposition; LoHa: w1's), and 1 without an alpha or a decomposition."""
    if alpha is None:
        return 1.0
    if "hada_w1_b" in factors:
        return alpha / factors["hada_w1_b"].shape[0]
    inner = factors.get("lokr_w2_b", factors.get("lokr_w1_b"))
    return alpha / inner.shape[0] if inner is not None else 1.0


def _factor_pairs(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None):
    """The ways to write a Kronecker factor as a product P @ Q (P's columns are what a LoRA pays in rank)."""
    if full is None:
        full = a @ b
    pairs = [(full, torch.eye(full.shape[1])), (torch.eye(full.shape[0]), full)]
    return pairs + ([(a, b)] if a is not None else [])


def lycoris_as_lora(factors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoKr or LoHa module's change as an exact LoRA pair (up, down) with up @ down == dW (scale not applied).
    LoHa: (w1a w1b) * (w2a w2b) = U D with U's column (i, j) = w1a[:, i] * w2a[:, j] and D's row (i, j) =
    w1b[i] * w2b[j]: rank r1 r2. LoKr: kron(P1 Q1, P2 Q2) = kron(P1, P2) kron(Q1, Q2), taking the factorisations
    of w1 and w2 that give the least rank. Either is exact; a rank past the layer's smaller side is written full."""
    f = {k: v.float() for k, v in factors.items()}
    if "hada_w1_a" in f:
        w1a, w1b, w2a, w2b = f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"]
        up = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
        down = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    else:
        first = _factor_pairs(f.get("lokr_w1"), f.get("lokr_w1_a"), f.get("lokr_w1_b"))
        second = _factor_pairs(f.get("lokr_w2"), f.get("lokr_w2_a"), f.get("lokr_w2_b"))
        (p1, q1), (p2, q2) = min(
            ((x, y) for x in first for y in second),
            key=lambda xy: xy[0][0].shape[1] * xy[1][0].shape[1],
        )
        up, down = torch.kron(p1, p2), torch.kron(q1, q2)
    out_features, in_features = up.shape[0], down.shape[1]
    if up.shape[1] >= min(out_features, in_features):  # no cheaper than the change itself
        delta = up @ down
        return (
            (delta, torch.eye(in_features))
            if in_features <= out_features
            else (torch.eye(out_features), delta)
        )
    return up, down


@dataclasses.dataclass
class Foreign:
    """Another layout read into ours: diffusers-layout LoRA tensors at scale 1, the DoRA scales it carried (per
    diffusers module, ComfyUI's dora_scale: made peft magnitudes once the base weights are at hand), and the
    keys that have no place in FLUX.2."""

    state: dict[str, torch.Tensor]
    dora_scales: dict[str, torch.Tensor]
    unplaced: list[str]


def from_foreign(state: dict[str, torch.Tensor]) -> Foreign:
    """A BFL/ai-toolkit/ComfyUI or kohya/musubi file (LoRA, LoKr, LoHa or DoRA) -> our layout, exactly: alpha
    baked into lora_B, LyCORIS factors made an exact LoRA pair, fused qkv split by rows, the adaLN halves put
    back in diffusers' order."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unplaced = []
    for key, tensor in state.items():
        m = _ROLE.match(key)
        if not m:
            unplaced.append(key)
            continue
        modules.setdefault(m["prefix"], {})[m["role"]] = tensor
    out, scales = {}, {}
    for prefix, parts in modules.items():
        placed = _targets(prefix)
        if placed is None:
            unplaced.append(prefix)
            continue
        targets, swapped = placed
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        down = next((parts[r] for r in _DOWN if r in parts), None)
        up = next((parts[r] for r in _UP if r in parts), None)
        if up is not None and down is not None:
            dtype = up.dtype
            up = up.float() * (alpha / down.shape[0] if alpha is not None else 1.0)
        elif any(r.startswith(("lokr_", "hada_")) for r in parts):
            dtype = next(v.dtype for r, v in parts.items() if r.startswith(("lokr_", "hada_")))
            factors = {r: v for r, v in parts.items() if r.startswith(("lokr_", "hada_"))}
            up, down = lycoris_as_lora(factors)
            up = up * lycoris_scale(factors, alpha)
        else:
            unplaced.append(f"{prefix} (half a pair)")
            continue
        dora = parts.get("dora_scale")
        if swapped:
            up = _swap_halves(up)
            dora = _swap_halves(dora) if dora is not None else None
        for target, rows, scale in zip(
            targets,
            up.chunk(len(targets)),
            dora.reshape(-1).chunk(len(targets)) if dora is not None else [None] * 3,
        ):
            out[f"transformer.{target}.lora_A.weight"] = down.to(dtype).contiguous()
            out[f"transformer.{target}.lora_B.weight"] = rows.to(dtype).contiguous()
            if scale is not None:
                scales[target] = scale.float()
    return Foreign(out, scales, list(dict.fromkeys(unplaced)))


def dora_magnitudes(foreign: Foreign, weight_of) -> dict[str, torch.Tensor]:
    """peft's DoRA magnitudes from ComfyUI's dora_scale: ComfyUI makes a row W' = (W + dW) * dora_scale / |W| (the
    base row's norm), peft W' = (W + dW) * m / |W + dW|, so m = dora_scale * |W + dW| / |W|. `weight_of(module)`
    is the base weight."""
    magnitudes = {}
    for module, scale in foreign.dora_scales.items():
        weight = weight_of(module).float()
        delta = (
            foreign.state[f"transformer.{module}.lora_B.weight"].float()
            @ foreign.state[f"transformer.{module}.lora_A.weight"].float()
        )
        magnitudes[module] = scale * (weight + delta).norm(dim=1) / weight.norm(dim=1)
    return magnitudes


def dora_scales(
    magnitudes: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], weight_of
) -> dict:
    """The inverse, for export: ComfyUI's dora_scale (one per output row) of each peft DoRA module."""
    return {
        module: m.float()
        * weight_of(module).float().norm(dim=1)
        / (weight_of(module).float() + deltas[module]).norm(dim=1)
        for module, m in magnitudes.items()
    }


# ---- out: LoKr / LoHa (LyCORIS factors) -> the LyCORIS layout ComfyUI reads ----------------------------------
# LyCORIS keys per module: lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b (dW = kron(w1, w2));
# hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (dW = (w1_a w1_b) * (w2_a w2_b)); `.alpha` with scale alpha / dim,
# dim = the inner rank (1 when nothing is decomposed). A Kronecker or Hadamard factorisation of q, k and v does not
# fuse into one for BFL's qkv, so those modules keep their diffusers names, which ComfyUI (v0.11+) maps onto their
# rows of the fused weight; every other module takes its BFL name.
def lycoris_layout(
    modules: dict[str, dict[str, torch.Tensor]], kind: str, scale: float
) -> dict[str, torch.Tensor]:
    """{diffusers module: {factor: tensor}} of a peft LoKr/LoHa at scale `scale` -> LyCORIS-layout tensors at the
    same change. The scale goes into the first factor and `.alpha` equals the inner rank, so alpha / dim = 1."""
    tensors, unmapped = {}, []
    for module, factors in sorted(modules.items()):
        try:
            name, part = bfl_name(module)
        except KeyError:
            unmapped.append(module)
            continue
        factors = dict(factors)
        # the layout's first factor: a whole or decomposed Kronecker w1, or the Hadamard product's first pair
        first = next(f for f in ("lokr_w1", "lokr_w1_a", "hada_w1_a") if f in factors)
        factors[first] = factors[first] * scale
        if name == SWAPPED:
            factors = _swap_lycoris_rows(module, factors)
        prefix = f"transformer.{module}" if part is not None else f"diffusion_model.{name}"
        tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in factors.items()})
        inner = factors.get("lokr_w2_b", factors.get("lokr_w1_b", factors.get("hada_w1_b")))
        if inner is not None:
            tensors[f"{prefix}.alpha"] = torch.tensor(float(inner.shape[0]))
    if unmapped:
        raise UserError(
            f"{len(unmapped)} {kind} module(s) have no BFL name, so the export would drop them "
            f"(e.g. {', '.join(unmapped[:3])}); export as diffusers instead"
        )
    return tensors


def _swap_lycoris_rows(module: str, factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Swap the output halves of dW (BFL's adaLN order). Hadamard: the rows of both left factors. Kronecker: the
    rows of w1, which permutes whole blocks of kron(w1, w2), so w1 needs an even number of rows."""
    hadamard = "hada_w1_a" in factors
    left = (
        ("hada_w1_a", "hada_w2_a")
        if hadamard
        else ("lokr_w1" if "lokr_w1" in factors else "lokr_w1_a",)
    )
    if not hadamard and factors[left[0]].shape[0] % 2:
        raise UserError(
            f"the lokr module {module} cannot be written in BFL's row order (its Kronecker factor has "
            f"an odd row count); train without it (lora.targets) or export as diffusers"
        )
    return {**factors, **{k: _swap_halves(factors[k]) for k in left}}
