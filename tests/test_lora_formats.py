"""LoRA files other tools load in full: alpha baked, exports to the BFL/ComfyUI/kohya layouts and back, exactly."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import UserError
from flux2_lora import main
from inference.adapters import load_adapter
from inference.export import export_lora
from inference.families import FAMILIES
from inference.lora_formats import (
    SWAPPED,
    bfl_name,
    diffusers_names,
    from_foreign,
    to_bfl,
)
from inference.lora_io import save_lora
from inference.tiny import build_tiny_pipeline
from trainer.lora import LoraSettings, add_lora

PRESETS = ("attention", "attention_mlp", "all_linear")


def _random_lora(family: str, preset: str, out, rank=4, alpha=6.0):
    """A LoRA with every weight non-zero (a fresh one has lora_B = 0, which would hide mapping mistakes)."""
    transformer = build_tiny_pipeline(FAMILIES[family]).transformer
    add_lora(transformer, LoraSettings(rank=rank, alpha=alpha, targets=preset), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _n, p in transformer.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_lora(
        out,
        transformer,
        FAMILIES[family],
        {"family": family, "type": "lora", "rank": rank, "alpha": alpha},
    )
    return transformer


def _deltas(transformer, adapter="default") -> dict[str, torch.Tensor]:
    """Every LoRA module's merged change to its weight, as peft applies it (scale included)."""
    from peft.tuners.lora import LoraLayer

    return {
        n: m.get_delta_weight(adapter).detach()
        for n, m in transformer.named_modules()
        if isinstance(m, LoraLayer) and adapter in m.lora_A
    }


def test_alpha_is_baked_so_every_loader_applies_the_intended_change(tmp_path):
    trained = _random_lora("klein", "attention_mlp", tmp_path / "a.safetensors", rank=4, alpha=6.0)
    intended = _deltas(trained)  # 1.5 * B @ A
    file = load_file(tmp_path / "a.safetensors")
    for module, delta in intended.items():
        a, b = (
            file[f"transformer.{module}.lora_A.weight"],
            file[f"transformer.{module}.lora_B.weight"],
        )
        # what ComfyUI applies with no .alpha tensor: scale 1
        torch.testing.assert_close(b @ a, delta)
    # the stock diffusers loader gives the same change
    pipe = build_tiny_pipeline(FAMILIES["klein"])
    pipe.load_lora_weights(str(tmp_path), weight_name="a.safetensors", adapter_name="x")
    for module, delta in _deltas(pipe.transformer, "x").items():
        torch.testing.assert_close(delta, intended[module])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("fmt", ["bfl", "comfyui", "kohya"])
def test_exports_round_trip_exactly(family, preset, fmt, tmp_path):
    trained = _random_lora(family, preset, tmp_path / "ours.safetensors")
    intended = _deltas(trained)
    counts = export_lora(tmp_path / "ours.safetensors", fmt, tmp_path / f"{fmt}.safetensors")
    assert counts["modules"] == len(intended)  # every module of every preset maps: nothing dropped
    exported = load_file(tmp_path / f"{fmt}.safetensors")
    assert all(
        k.startswith("lora_unet_" if fmt == "kohya" else "diffusion_model.") for k in exported
    )
    # kohya names carry alpha = rank (musubi reads it); BFL names none (an .alpha key makes diffusers refuse)
    alphas = sum(k.endswith(".alpha") for k in exported)
    assert alphas == (counts["written_modules"] if fmt == "kohya" else 0)
    read = from_foreign(exported)
    converted = read.state
    assert not read.unplaced
    # the independent inverse: ΔW from the file's own tensors
    for module, delta in intended.items():
        b, a = (
            converted[f"transformer.{module}.lora_B.weight"],
            converted[f"transformer.{module}.lora_A.weight"],
        )
        torch.testing.assert_close(b @ a, delta, atol=1e-6, rtol=1e-5)
    # and as generate loads it: every module, the same change
    pipe = build_tiny_pipeline(FAMILIES[family])
    load_adapter(pipe, family, tmp_path / f"{fmt}.safetensors", "x")
    loaded = _deltas(pipe.transformer, "x")
    assert loaded.keys() == intended.keys()
    for module, delta in intended.items():
        torch.testing.assert_close(loaded[module], delta, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["bfl", "kohya"])
def test_diffusers_own_converters_agree_on_the_blocks(fmt, tmp_path):
    """The BFL (ai-toolkit) and kohya exports of the attention+MLP preset, read by diffusers' own converters."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_kohya_flux2_lora_to_diffusers,
        _convert_non_diffusers_flux2_lora_to_diffusers,
    )

    trained = _random_lora("klein", "attention_mlp", tmp_path / "ours.safetensors")
    export_lora(tmp_path / "ours.safetensors", fmt, tmp_path / "out.safetensors")
    exported = load_file(tmp_path / "out.safetensors")
    convert = (
        _convert_kohya_flux2_lora_to_diffusers
        if fmt == "kohya"
        else _convert_non_diffusers_flux2_lora_to_diffusers
    )
    theirs = convert(dict(exported))
    pairs = {k[: -len(".lora_A.weight")]: k for k in theirs if k.endswith(".lora_A.weight")}
    assert len(pairs) == len(_deltas(trained))
    for prefix in pairs:
        module = prefix.removeprefix("transformer.")
        delta = theirs[f"{prefix}.lora_B.weight"] @ theirs[f"{prefix}.lora_A.weight"]
        torch.testing.assert_close(delta, _deltas(trained)[module], atol=1e-6, rtol=1e-5)


def test_foreign_fixtures_with_alpha_load_exactly(tmp_path):
    """A musubi/kohya file with alpha != rank and an ai-toolkit file without alpha, built in their real layouts."""
    trained = _random_lora("dev", "all_linear", tmp_path / "ours.safetensors")
    intended = _deltas(trained)
    export_lora(tmp_path / "ours.safetensors", "kohya", tmp_path / "k.safetensors")
    kohya = load_file(tmp_path / "k.safetensors")
    # alpha = rank/2: the up weights twice as large
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = kohya[key] / 2
        kohya[key.replace(".alpha", ".lora_up.weight")] *= 2
    save_file(kohya, str(tmp_path / "musubi.safetensors"))
    pipe = build_tiny_pipeline(FAMILIES["dev"])
    load_adapter(pipe, "dev", tmp_path / "musubi.safetensors", "m")
    for module, delta in _deltas(pipe.transformer, "m").items():
        torch.testing.assert_close(delta, intended[module], atol=1e-6, rtol=1e-5)


def test_a_file_with_modules_nobody_can_place_is_refused_unless_partial(tmp_path):
    _random_lora("klein", "attention", tmp_path / "ours.safetensors")
    export_lora(tmp_path / "ours.safetensors", "bfl", tmp_path / "b.safetensors")
    state = load_file(tmp_path / "b.safetensors")
    state["diffusion_model.vision_tower.proj.lora_A.weight"] = torch.zeros(4, 8)
    state["diffusion_model.vision_tower.proj.lora_B.weight"] = torch.zeros(8, 4)
    save_file(state, str(tmp_path / "odd.safetensors"))
    pipe = build_tiny_pipeline(FAMILIES["klein"])
    with pytest.raises(
        UserError, match="1 of its modules have no place in FLUX.2 .* pass --allow-partial"
    ):
        load_adapter(pipe, "klein", tmp_path / "odd.safetensors", "x")
    load_adapter(pipe, "klein", tmp_path / "odd.safetensors", "x", allow_partial=True)


def test_names_map_both_ways():
    assert diffusers_names("double_blocks.3.img_attn.qkv") == [
        f"transformer_blocks.3.attn.to_{c}" for c in "qkv"
    ]
    assert diffusers_names("final_layer.adaLN_modulation.1") == ["norm_out.linear"]
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    fused = to_bfl({"norm_out.linear": (a, b)})["final_layer.adaLN_modulation.1"][1]
    # (scale, shift) -> (shift, scale)
    assert torch.equal(fused[:3], b[3:]) and torch.equal(fused[3:], b[:3])


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (
            ["--format", "onnx"],
            "--format 'onnx' is unknown; use one of diffusers, bfl, comfyui, kohya",
        ),
        (["--format", "kohya", "--out", "SAME"], "would overwrite or sit inside the input"),
        (["--format", "kohya", "--out", "x.bin"], "must end in .safetensors"),
    ],
)
def test_export_bad_input_is_one_line(argv_tail, message, tmp_path, capsys):
    _random_lora("klein", "attention", tmp_path / "ours.safetensors")
    argv = ["export", str(tmp_path / "ours.safetensors"), *argv_tail]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o.safetensors")]
    argv = [str(tmp_path / "ours.safetensors") if a == "SAME" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.safetensors").exists()


def test_export_refuses_files_it_cannot_represent(tmp_path):
    save_file({"unet.x.weight": torch.zeros(2)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(UserError, match="holds no FLUX.2 transformer LoRA weights"):
        export_lora(tmp_path / "sd.safetensors", "kohya", tmp_path / "o.safetensors")
    for kind, fmt, message in [
        (
            "dora",
            "kohya",
            "a dora adapter cannot be exported as kohya: musubi-tuner and kohya apply no DoRA",
        ),
        ("dora", "comfyui", "a dora adapter exports as comfyui only with its base model's weights"),
    ]:
        _random_adapter("klein", "attention", kind, tmp_path / f"{kind}.safetensors")
        with pytest.raises(UserError, match=message):
            export_lora(tmp_path / f"{kind}.safetensors", fmt, tmp_path / "o.safetensors")
        assert not (tmp_path / "o.safetensors").exists()


def _random_adapter(family: str, preset: str, kind: str, out, rank=4, alpha=6.0):
    """A LoKr/LoHa/DoRA with every trainable tensor random (fresh ones hide mapping mistakes behind zeros)."""
    transformer = build_tiny_pipeline(FAMILIES[family]).transformer
    add_lora(transformer, LoraSettings(type=kind, rank=rank, alpha=alpha, targets=preset), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in transformer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_lora(out, transformer, FAMILIES[family], {"family": family, "type": kind})
    return transformer


def _lycoris_delta(t: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """ΔW of one LyCORIS module as ComfyUI's LoKr / LoHa adapters compute it (alpha / dim, dim = inner rank)."""

    def get(name):
        return t.get(f"{prefix}.{name}")

    alpha = get("alpha")
    if get("hada_w1_a") is not None:
        delta = (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b"))
        return delta * (alpha / get("hada_w1_b").shape[0] if alpha is not None else 1.0)
    dim = None
    w1 = get("lokr_w1")
    if w1 is None:
        dim, w1 = get("lokr_w1_b").shape[0], get("lokr_w1_a") @ get("lokr_w1_b")
    w2 = get("lokr_w2")
    if w2 is None:
        dim, w2 = get("lokr_w2_b").shape[0], get("lokr_w2_a") @ get("lokr_w2_b")
    return torch.kron(w1, w2) * (alpha / dim if alpha is not None and dim is not None else 1.0)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lycoris_exports_apply_exactly_the_trained_change(family, preset, kind, tmp_path):
    from peft.tuners.lycoris_utils import LycorisLayer

    trained = _random_adapter(family, preset, kind, tmp_path / "ours.safetensors")
    intended = {
        n: m.get_delta_weight("default").detach()
        for n, m in trained.named_modules()
        if isinstance(m, LycorisLayer) and "default" in m.active_adapters
    }
    counts = export_lora(tmp_path / "ours.safetensors", "comfyui", tmp_path / "c.safetensors")
    exported = load_file(tmp_path / "c.safetensors")
    prefixes = {k.rsplit(".", 1)[0] for k in exported}
    assert counts["modules"] == len(intended) == len(prefixes)  # nothing dropped
    applied = {}
    # the independent inverse: names back to diffusers, ΔW from the file's own tensors
    for prefix in prefixes:
        delta = _lycoris_delta(exported, prefix)
        # q / k / v: ComfyUI maps them onto their rows of BFL's qkv
        if prefix.startswith("transformer."):
            applied[prefix.removeprefix("transformer.")] = delta
        else:
            bfl = prefix.removeprefix("diffusion_model.")
            assert bfl_name(diffusers_names(bfl)[0])[1] is None
            applied[diffusers_names(bfl)[0]] = (
                torch.cat(delta.chunk(2)[::-1]) if bfl == SWAPPED else delta
            )
    assert applied.keys() == intended.keys()
    for module, delta in intended.items():
        torch.testing.assert_close(applied[module], delta, atol=1e-5, rtol=1e-4)


def test_training_can_write_the_other_layouts_too(tiny_models, sample_data, shared_cache, tmp_path):
    from helpers import train_args
    from trainer.config import load_config
    from trainer.recipe import run

    cfg = load_config(
        None,
        train_args(tiny_models["klein"], sample_data, tmp_path / "r", shared_cache, train__steps=2)
        + ["output.export=[comfyui, kohya]"],
    )
    run(cfg, show_progress=False)
    assert (tmp_path / "r" / "pytorch_lora_weights_comfyui.safetensors").is_file()
    assert (tmp_path / "r" / "pytorch_lora_weights_kohya.safetensors").is_file()
    with pytest.raises(
        UserError, match="output.export: a dora adapter cannot be exported as kohya"
    ):
        load_config(
            None, ["model.path=m", "data.path=d", "lora.type=dora", "output.export=[kohya]"]
        )
    # LoKr reaches every layout now (kohya / bfl as its exact plain LoRA), DoRA comfyui with the run's base
    load_config(
        None,
        ["model.path=m", "data.path=d", "lora.type=lokr", "output.export=[comfyui, bfl, kohya]"],
    )
    load_config(
        None, ["model.path=m", "data.path=d", "lora.type=dora", "output.export=[comfyui, bfl]"]
    )
    cfg = load_config(
        None,
        train_args(
            tiny_models["klein"],
            sample_data,
            tmp_path / "l",
            shared_cache,
            train__steps=2,
            lora__type="loha",
        )
        + ["output.export=[comfyui]"],
    )
    run(cfg, show_progress=False)
    assert any(
        k.endswith(".hada_w1_a")
        for k in load_file(tmp_path / "l" / "pytorch_lora_weights_comfyui.safetensors")
    )


@pytest.mark.parametrize(
    "factors",
    [
        {"hada_w1_a": (12, 3), "hada_w1_b": (3, 10), "hada_w2_a": (12, 2), "hada_w2_b": (2, 10)},
        {
            "lokr_w1": (3, 2),
            "lokr_w2_a": (4, 2),
            "lokr_w2_b": (2, 5),
        },  # the usual LoKr: w2 decomposed
        {"lokr_w1_a": (3, 1), "lokr_w1_b": (1, 2), "lokr_w2": (4, 5)},
        {
            "lokr_w1": (3, 2),
            "lokr_w2": (4, 5),
        },  # nothing decomposed: rank past the smaller side, written full
    ],
)
def test_a_lycoris_change_is_an_exact_lora_pair(factors):
    from inference.lora_formats import lycoris_as_lora

    g = torch.Generator().manual_seed(0)
    t = {k: torch.randn(shape, generator=g) for k, shape in factors.items()}
    if "hada_w1_a" in t:
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        delta = torch.kron(w1, w2)
    up, down = lycoris_as_lora(t)
    torch.testing.assert_close(up @ down, delta, atol=1e-5, rtol=1e-5)
    assert up.shape[1] <= min(delta.shape)  # never more rank than the change itself has room for
    if "hada_w1_a" in t:
        assert up.shape[1] == 3 * 2  # r1 r2
    elif "lokr_w2_a" in t:
        assert up.shape[1] == 2 * 2  # w1's columns x w2's rank


def test_comfyui_dora_scales_and_peft_magnitudes_are_inverse():
    from inference.lora_formats import Foreign, dora_magnitudes, dora_scales

    g = torch.Generator().manual_seed(0)
    weight, a, b = (
        torch.randn(6, 5, generator=g),
        torch.randn(2, 5, generator=g),
        torch.randn(6, 2, generator=g),
    )
    magnitude = torch.rand(6, generator=g) + 0.5
    scale = dora_scales({"m": magnitude}, {"m": b @ a}, lambda _: weight)["m"]
    # ComfyUI's row rule with this scale is peft's DoRA: (W + dW) * scale / |W| == (W + dW) * m / |W + dW|
    comfy = (weight + b @ a) * (scale / weight.norm(dim=1))[:, None]
    peft = (weight + b @ a) * (magnitude / (weight + b @ a).norm(dim=1))[:, None]
    torch.testing.assert_close(comfy, peft)
    back = Foreign(
        {"transformer.m.lora_A.weight": a, "transformer.m.lora_B.weight": b}, {"m": scale}, []
    )
    torch.testing.assert_close(dora_magnitudes(back, lambda _: weight)["m"], magnitude)


def test_a_dora_export_reads_the_base_the_header_names_or_is_refused(tiny_models, tmp_path, capsys):
    _random_adapter("klein", "attention", "dora", tmp_path / "d.safetensors")
    argv = [
        "export",
        str(tmp_path / "d.safetensors"),
        "--format",
        "comfyui",
        "--out",
        str(tmp_path / "c.safetensors"),
    ]
    assert main(argv) == 2  # the header names no base, and none was given
    assert (
        "add --model PATH" in capsys.readouterr().err and not (tmp_path / "c.safetensors").exists()
    )
    assert main([*argv, "--model", str(tmp_path / "nowhere")]) == 2
    assert "a dora export reads the base weights" in capsys.readouterr().err
