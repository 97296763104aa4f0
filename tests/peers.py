"""How other tools apply a FLUX.2 LoRA file, replayed from their loaders' rules (their code is not vendored, and
none of this uses inference/lora_formats.py, so a mistake there cannot hide in both). Each replay patches the
original (BFL) model's weights, which ComfyUI, musubi-tuner and ai-toolkit all run, and reports the keys it used.

Rules, from the tools' sources at the versions the interop issue measured:
- ComfyUI (comfy/lora.py, comfy/weight_adapter/ at 9c0cf36): model keys give `diffusion_model.<bfl>` and
  `lora_unet_<bfl with _>`; diffusers names `transformer.<module>` for the blocks, the embedders, proj_out and
  norm_out (whose diff has its halves swapped), q/k/v onto their rows of the fused qkv; no diffusers name for the
  modulation layers or time_guidance_embed. alpha only from `<prefix>.alpha` (none: scale 1); LoKr scale
  alpha / dim, LoHa alpha / w1_b's rows; `dora_scale` of shape (out, 1) scales each row of W + dW by
  dora_scale / |W| (the base row), of shape (1, in) each column by dora_scale / |W + dW|.
- musubi-tuner (utils/lora_utils.py, convert_lora.py at 30c658c): a `diffusion_model.` / `transformer.` file is
  first converted (dots to underscores under `lora_unet_`, lora_A/B -> lora_down/up, alpha = rank when absent),
  then merged per model weight `lora_unet_<bfl with _>` with scale alpha / rank; LoKr / LoHa likewise; no DoRA.
- ai-toolkit (toolkit/network_mixins.py, lora_special.py at 27a03a9): a network of the user's rank R and alpha A
  on the blocks' Linear layers only (transformer_only: true, the default); loaded tensors are cut or zero-padded
  to R ([:R] of lora_down's rows, [:, :R] of lora_up's columns), `.alpha` keys ignored, scale A / R.
"""

from __future__ import annotations

import torch


def _modules(transformer) -> dict[str, torch.Tensor]:
    return {
        n: getattr(m, "base_layer", m).weight.detach().float()
        for n, m in transformer.named_modules()
        if isinstance(getattr(m, "base_layer", m), torch.nn.Linear)
    }


def bfl_model(transformer) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, int, int]]]:
    """The original model's Linear weights (`diffusion_model.<name>.weight`) from a diffusers FLUX.2 transformer, and
    where each diffusers module sits in them: (BFL key, first row, rows)."""
    w = _modules(transformer)
    weights, where = {}, {}

    def put(bfl: str, *parts: str, swap: bool = False):
        key = f"diffusion_model.{bfl}.weight"
        tensors = [w[p] for p in parts]
        weights[key] = torch.cat(tensors)
        if swap:
            weights[key] = torch.cat(weights[key].chunk(2)[::-1])
        row = 0
        for p, t in zip(parts, tensors):
            where[p] = (key, row, t.shape[0])
            row += t.shape[0]

    for i in range(len(transformer.transformer_blocks)):
        d = f"transformer_blocks.{i}"
        put(f"double_blocks.{i}.img_attn.qkv", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")
        put(
            f"double_blocks.{i}.txt_attn.qkv",
            f"{d}.attn.add_q_proj",
            f"{d}.attn.add_k_proj",
            f"{d}.attn.add_v_proj",
        )
        put(f"double_blocks.{i}.img_attn.proj", f"{d}.attn.to_out.0")
        put(f"double_blocks.{i}.txt_attn.proj", f"{d}.attn.to_add_out")
        for side, ff in (("img", "ff"), ("txt", "ff_context")):
            put(f"double_blocks.{i}.{side}_mlp.0", f"{d}.{ff}.linear_in")
            put(f"double_blocks.{i}.{side}_mlp.2", f"{d}.{ff}.linear_out")
    for i in range(len(transformer.single_transformer_blocks)):
        put(f"single_blocks.{i}.linear1", f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj")
        put(f"single_blocks.{i}.linear2", f"single_transformer_blocks.{i}.attn.to_out")
    put("img_in", "x_embedder")
    put("txt_in", "context_embedder")
    put("final_layer.linear", "proj_out")
    put("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    put("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1")
    put("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2")
    if "time_guidance_embed.guidance_embedder.linear_1" in w:
        put("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1")
        put("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2")
    for name in (
        "double_stream_modulation_img",
        "double_stream_modulation_txt",
        "single_stream_modulation",
    ):
        put(f"{name}.lin", f"{name}.linear")
    return weights, where


def _lycoris_delta(get, alpha: float | None, shape) -> torch.Tensor | None:
    if get("hada_w1_a") is not None:
        delta = (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b"))
        return delta * (alpha / get("hada_w1_b").shape[0] if alpha is not None else 1.0)
    if get("lokr_w1") is None and get("lokr_w1_a") is None:
        return None
    dim, w1, w2 = None, get("lokr_w1"), get("lokr_w2")
    if w1 is None:
        dim, w1 = get("lokr_w1_b").shape[0], get("lokr_w1_a") @ get("lokr_w1_b")
    if w2 is None:
        dim, w2 = get("lokr_w2_b").shape[0], get("lokr_w2_a") @ get("lokr_w2_b")
    return torch.kron(w1, w2).reshape(shape) * (
        alpha / dim if alpha is not None and dim is not None else 1.0
    )


def comfyui(base: dict[str, torch.Tensor], where: dict, lora: dict[str, torch.Tensor]):
    """-> (patched weights, keys of the file it used)."""
    lora = {k: v.float() for k, v in lora.items()}
    key_map = {}
    for key in base:
        name = key[len("diffusion_model.") : -len(".weight")]
        key_map[f"diffusion_model.{name}"] = (key, None, False)
        key_map["lora_unet_" + name.replace(".", "_")] = (key, None, False)
    for module, (key, row, rows) in where.items():
        if "modulation" in module or module.startswith("time_guidance_embed"):
            continue
        fused = base[key].shape[0] != rows
        key_map[f"transformer.{module}"] = (
            key,
            (row, rows) if fused else None,
            module == "norm_out.linear",
        )
    patched, used = {k: v.clone() for k, v in base.items()}, set()
    for prefix, (key, offset, swap) in key_map.items():

        def get(name, prefix=prefix):
            return lora.get(f"{prefix}.{name}")

        alpha = get("alpha")
        alpha = float(alpha) if alpha is not None else None
        weight = patched[key] if offset is None else patched[key][offset[0] : offset[0] + offset[1]]
        up = next((get(n) for n in ("lora_up.weight", "lora_B.weight") if get(n) is not None), None)
        down = next(
            (get(n) for n in ("lora_down.weight", "lora_A.weight") if get(n) is not None), None
        )
        if up is not None and down is not None:
            delta = (up @ down) * (alpha / down.shape[0] if alpha is not None else 1.0)
            names = ("lora_up.weight", "lora_down.weight", "lora_B.weight", "lora_A.weight")
        else:
            delta = _lycoris_delta(get, alpha, weight.shape)
            names = (
                "lokr_w1",
                "lokr_w1_a",
                "lokr_w1_b",
                "lokr_w2",
                "lokr_w2_a",
                "lokr_w2_b",
                "hada_w1_a",
                "hada_w1_b",
                "hada_w2_a",
                "hada_w2_b",
            )
        if delta is None:
            continue
        used |= {f"{prefix}.{n}" for n in (*names, "alpha", "dora_scale") if get(n) is not None}
        if swap:
            delta = torch.cat(delta.chunk(2)[::-1])
        scale = get("dora_scale")
        if scale is None:
            weight += delta
        elif scale.shape[0] == weight.shape[0]:  # one per output row: over the base row's norm
            weight.copy_((weight + delta) * scale / weight.norm(dim=1, keepdim=True))
        else:  # one per input column: over the merged column's norm
            merged = weight + delta
            weight.copy_(merged * scale / merged.norm(dim=0, keepdim=True))
    return patched, used


def _to_musubi(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """convert_lora.py's conversion of a diffusers-prefixed file (lora_unet_ files are used as they are)."""
    if all(k.startswith("lora_unet_") for k in lora):
        return lora
    out = {}
    for key, value in lora.items():
        prefix, _, body = key.partition(".")
        if prefix not in ("diffusion_model", "transformer"):
            continue
        new = ("lora_unet_" + body).replace(".", "_")
        new = new.replace("_lora_A_weight", ".lora_down.weight").replace(
            "_lora_B_weight", ".lora_up.weight"
        )
        new = new.replace("_lora_down_weight", ".lora_down.weight").replace(
            "_lora_up_weight", ".lora_up.weight"
        )
        for factor in ("hada_", "lokr_"):
            new = new.replace(f"_{factor}", f".{factor}", 1) if f"_{factor}" in new else new
        if new.endswith("_alpha"):
            new = new[: -len("_alpha")] + ".alpha"
        out[new] = value
    for key in [k for k in out if k.endswith(".lora_down.weight")]:
        out.setdefault(
            key.replace(".lora_down.weight", ".alpha"), torch.tensor(float(out[key].shape[0]))
        )
    return out


def musubi(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]):
    lora = {k: v.float() for k, v in _to_musubi(lora).items()}
    patched, used = {k: v.clone() for k, v in base.items()}, set()
    for key in base:
        name = "lora_unet_" + key[len("diffusion_model.") : -len(".weight")].replace(".", "_")

        def get(n, name=name):
            return lora.get(f"{name}.{n}")

        alpha = get("alpha")
        if get("lora_down.weight") is not None and get("lora_up.weight") is not None:
            down, up = get("lora_down.weight"), get("lora_up.weight")
            patched[key] += (
                up @ down * ((float(alpha) if alpha is not None else down.shape[0]) / down.shape[0])
            )
            used |= {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
        elif (
            delta := _lycoris_delta(
                get, float(alpha) if alpha is not None else None, base[key].shape
            )
        ) is not None:
            patched[key] += delta
            used |= {f"{name}.{k.split('.', 1)[1]}" for k in lora if k.startswith(name + ".")}
    return patched, used & set(lora)


def ai_toolkit(
    base: dict[str, torch.Tensor],
    lora: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    transformer_only: bool = True,
):
    lora = {k: v.float() for k, v in lora.items()}
    patched, used = {k: v.clone() for k, v in base.items()}, set()
    for key in base:
        name = key[len("diffusion_model.") : -len(".weight")]
        if transformer_only and not name.startswith(("double_blocks", "single_blocks")):
            continue
        down, up = (
            lora.get(f"diffusion_model.{name}.lora_A.weight"),
            lora.get(f"diffusion_model.{name}.lora_B.weight"),
        )
        if down is None or up is None:
            continue
        fit_down, fit_up = torch.zeros(rank, down.shape[1]), torch.zeros(up.shape[0], rank)
        r = min(rank, down.shape[0])
        # cut or zero-padded to the network's rank
        fit_down[:r], fit_up[:, :r] = (
            down[:r],
            up[:, :r],
        )
        patched[key] += fit_up @ fit_down * (alpha / rank)
        used |= {f"diffusion_model.{name}.lora_A.weight", f"diffusion_model.{name}.lora_B.weight"}
    return patched, used
