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
    comfyui    the bfl layout plus diffusion_model.<bfl>.alpha = rank (scale 1)        ComfyUI (any version)
    kohya      lora_unet_<bfl with _>.lora_down.weight / lora_up.weight / .alpha       musubi-tuner, kohya, ComfyUI
"""

from __future__ import annotations

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
    bfl_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], fmt: Format
) -> dict[str, torch.Tensor]:
    """{BFL module: (down, up)} -> the tensors of `fmt` (bfl, comfyui or kohya), scale 1 everywhere."""
    tensors = {}
    for name, (down, up) in sorted(bfl_pairs.items()):
        rank = torch.tensor(float(down.shape[0]))
        if fmt == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            tensors.update(
                {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": rank}
            )
        else:
            key = f"diffusion_model.{name}"
            tensors.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
            if fmt == "comfyui":
                tensors[f"{key}.alpha"] = rank
    return {k: v.contiguous() for k, v in tensors.items()}


# ---- in: BFL / kohya layouts -> diffusers pairs ---------------------------------------------------------------
_KOHYA = re.compile(r"^lora_unet_(.+)\.(lora_down|lora_up)\.weight$")
_BFL = re.compile(
    r"^(?:diffusion_model\.)?((?:double_blocks|single_blocks|final_layer|img_in|txt_in|time_in|"
    r"guidance_in|double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)"
    r"[\w.]*?)\.(lora_A|lora_B|lora_down|lora_up)\.weight$"
)


# some tools write diffusers module names under the BFL prefix
_HYBRID = re.compile(r"^diffusion_model\.(.+)\.(lora_A|lora_B)\.weight$")


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


def is_foreign(keys) -> bool:
    """A file in the BFL or kohya layout (ours start with `transformer.`)."""
    return any(k.startswith(("lora_unet_", "diffusion_model.")) for k in keys)


def from_foreign(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A BFL/ai-toolkit/ComfyUI or kohya/musubi state dict -> (diffusers-layout tensors at scale 1, keys it could not
    place). alpha/rank is baked into lora_B; fused qkv splits exactly; the adaLN halves are put back in order."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    direct: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    unplaced = []
    for key, tensor in state.items():
        if key.endswith(".alpha"):
            alphas[key[: -len(".alpha")]] = float(tensor)
            continue
        m = _KOHYA.match(key)
        name = _kohya_to_bfl(m[1]) if m else None
        role = m[2] if m else None
        prefix = f"lora_unet_{m[1]}" if m else None
        if not m and (b := _BFL.match(key)):
            name, role = b[1], b[2]
            prefix = key[: key.rindex(f".{role}.")]
        elif not m and (d := _HYBRID.match(key)) and _is_diffusers_module(d[1]):
            name, role, prefix = bfl_name(d[1])[0] if bfl_name(d[1])[1] is None else None, d[2], key
            # a diffusers q/k/v under the BFL prefix: already split, place it as it is
            if name is None:
                direct.setdefault(d[1], {})["down" if d[2] == "lora_A" else "up"] = tensor
                continue
        if name is None:
            unplaced.append(re.sub(r"\.(lora_A|lora_B|lora_down|lora_up)\.weight$", "", key))
            continue
        pairs.setdefault(name, {"prefix": prefix})[
            "down" if role in ("lora_A", "lora_down") else "up"
        ] = tensor
    out = {}
    for name, p in pairs.items():
        if "down" not in p or "up" not in p:
            unplaced.append(f"{p['prefix']} (half a pair)")
            continue
        try:
            targets = diffusers_names(name)
        except KeyError:
            unplaced.append(p["prefix"])
            continue
        down, up = p["down"], p["up"].float()
        up = up * (alphas[p["prefix"]] / down.shape[0]) if p["prefix"] in alphas else up
        if name == SWAPPED:
            up = _swap_halves(up)
        rows = up.chunk(len(targets), dim=0)
        for target, part in zip(targets, rows):
            out[f"transformer.{target}.lora_A.weight"] = down
            out[f"transformer.{target}.lora_B.weight"] = part.to(p["up"].dtype).contiguous()
    for module, p in direct.items():
        out[f"transformer.{module}.lora_A.weight"], out[f"transformer.{module}.lora_B.weight"] = (
            p["down"],
            p["up"],
        )
    return out, list(dict.fromkeys(unplaced))


def _is_diffusers_module(name: str) -> bool:
    try:
        bfl_name(name)
    except KeyError:
        return False
    return True


# ---- out: LoKr / LoHa (LyCORIS factors) -> the LyCORIS layout ComfyUI reads ----------------------------------
# LyCORIS keys per module: lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b (dW = kron(w1, w2));
# hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (dW = (w1_a w1_b) * (w2_a w2_b)); `.alpha` with scale alpha / dim,
# dim = the inner rank (1 when nothing is decomposed). A Kronecker or Hadamard factorisation of q, k and v does not
# fuse into one for BFL's qkv, so those modules keep their diffusers names, which ComfyUI (v0.11+) maps onto their
# rows of the fused weight; every other module takes its BFL name.
LYCORIS = {
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
}


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
        first = (
            "lokr_w1" if "lokr_w1" in factors else ("lokr_w1_a" if kind == "lokr" else "hada_w1_a")
        )
        factors[first] = factors[first] * scale
        if name == SWAPPED:
            factors = _swap_lycoris_rows(module, factors, kind)
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


def _swap_lycoris_rows(
    module: str, factors: dict[str, torch.Tensor], kind: str
) -> dict[str, torch.Tensor]:
    """Swap the output halves of dW (BFL's adaLN order). LoHa: the rows of both left factors. LoKr: the rows of w1,
    which permutes whole blocks of kron(w1, w2), so w1 needs an even number of rows."""
    left = (
        ("hada_w1_a", "hada_w2_a")
        if kind == "loha"
        else ("lokr_w1" if "lokr_w1" in factors else "lokr_w1_a",)
    )
    if kind == "lokr" and factors[left[0]].shape[0] % 2:
        raise UserError(
            f"the lokr module {module} cannot be written in BFL's row order (its Kronecker factor has "
            f"an odd row count); train without it (lora.targets) or export as diffusers"
        )
    return {**factors, **{k: _swap_halves(factors[k]) for k in left}}
