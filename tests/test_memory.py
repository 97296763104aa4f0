"""The memory planner and quantised loading: checked against exact counts, published figures, steps measured on
CPU slices of the real widths, and every preset's stated card."""

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch

from common.configtree import from_dict, read_yaml
from common.errors import UserError
from flux2_lora import main
from helpers import HANG, REPO, train_args
from inference.loading import ModelConfig, empty_transformer, resolve_base_model
from inference.quantize import quantize_problem
from trainer.cache import CACHE_FORMAT
from trainer.config import Config, load_config
from trainer.memory import GIB, plan_training, train_step, transformer_shape
from trainer.memory_probe import measure_step
from trainer.memory_table import memory_table

HUB = {
    "dev": "black-forest-labs/FLUX.2-dev",
    "klein-4b": "black-forest-labs/FLUX.2-klein-base-4B",
    "klein-9b": "black-forest-labs/FLUX.2-klein-base-9B",
}


def _config(**overrides) -> Config:
    return load_config(
        None, ["data.path=data", *(f"{k.replace('__', '.')}={v}" for k, v in overrides.items())]
    )


@pytest.mark.parametrize(
    "model, transformer, text_encoder",
    [("dev", 32.22e9, 24.0e9), ("klein-9b", 9.08e9, 8.19e9), ("klein-4b", 3.88e9, 4.02e9)],
)
def test_shipped_architectures_count_the_real_models_offline(model, transformer, text_encoder):
    # no network: the configs ship with the package
    base = resolve_base_model(ModelConfig(path=HUB[model]))
    counted = sum(p.numel() for p in base.empty_transformer().parameters())
    assert counted == pytest.approx(transformer, rel=0.005)
    assert sum(p.numel() for p in base.empty_text_encoder().parameters()) == pytest.approx(
        text_encoder, rel=0.01
    )


@pytest.mark.parametrize("model, published_gb", [("klein-4b", 12), ("klein-9b", 22)])
def test_plan_is_within_20_percent_of_published_bf16_lora_figures(model, published_gb):
    """bf16 LoRA with gradient checkpointing at 1024^2 (SimpleTuner's tables)."""
    cfg = _config(
        model__path=HUB[model],
        model__dtype="bfloat16",
        train__mixed_precision="bf16",
        train__gradient_checkpointing=True,
        train__resolution=1024,
    )
    plan = plan_training(cfg, resolve_base_model(cfg.model), gpu_memory=80, ram=256)
    train = next(p for p in plan.phases if p.name == "train step")
    assert train.gpu / 1e9 == pytest.approx(published_gb, rel=0.2)


def test_the_same_maths_on_flux1_dev_match_the_published_qlora_figure():
    """diffusers' QLoRA post: FLUX.1-dev, nf4, 8-bit Adam, rank 4 attention, checkpointing, 512x768 -> ~9 GB."""
    config = json.loads(
        (REPO / "inference/architectures/flux1-dev/transformer/config.json").read_text()
    )
    # FLUX.1's edge layers (its single blocks have a proj_out of their own, which is quantised)
    keep = ("x_embedder", "context_embedder", "norm_out", "time_text_embed")
    shape = transformer_shape(empty_transformer(config), 2, 4, "lora", "attention", keep)
    step = train_step(
        shape,
        quantize="nf4",
        tokens=512 * 768 // 256 + 512,
        batch=1,
        act_bytes=2,
        checkpointing=True,
        targets="attention",
        optimizer="adamw8bit",
    )
    assert step.gpu / 1e9 == pytest.approx(9, rel=0.2)


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize(
    "quantize, checkpointing, targets",
    [("none", False, "attention_mlp"), ("int8", False, "attention"), ("fp8", True, "attention")],
)
def test_plan_is_within_10_percent_of_a_measured_step_at_real_width(
    quantize, checkpointing, targets
):
    """A slice of klein-4B at its real width (3072): 1 double + 1 single block, 16x16 latent tokens and 64 text
    tokens (not the calibration's 2 + 2 blocks and 672 tokens), a LoRA trained through peft with AdamW under bf16
    autocast."""
    measured, config = measure_step(1, 1, 16 * 16, 64, quantize, checkpointing, targets)
    shape = transformer_shape(empty_transformer(config), 2, 16, "lora", targets)
    planned = train_step(
        shape,
        quantize=quantize,
        tokens=16 * 16 + 64,
        batch=1,
        act_bytes=2,
        checkpointing=checkpointing,
        targets=targets,
        optimizer="adamw",
        on_gpu=False,
    )
    predicted = planned.parts["activations"] + planned.parts["dequantised weights"]
    assert predicted == pytest.approx(measured, rel=0.10), (planned.parts, measured)


_TARGET = re.compile(r"^# Target: (\d+) x (\d+) GB GPU, (\d+) GB RAM", re.M)


@pytest.mark.parametrize(
    "preset",
    sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name != "quickstart.yaml"),
)
def test_every_preset_fits_the_card_its_header_states(preset):
    text = (REPO / "configs" / preset).read_text()
    found = _TARGET.search(text)
    assert found, f"{preset} has no '# Target: N x G GB GPU, R GB RAM' line"
    gpus, gpu_gb, ram_gb = (int(g) for g in found.groups())
    cfg = from_dict(Config, read_yaml(REPO / "configs" / preset))
    assert (cfg.memory.gpus or 1) == gpus, (
        f"{preset}: memory.gpus must state the header's {gpus} GPUs"
    )
    # cards and RAM sold as "24 GB" hold 24 GiB (GPU) or a little less (RAM): plan against what they hold
    plan = plan_training(cfg, resolve_base_model(cfg.model), gpus, gpu_gb, ram_gb * 1e9 / GIB)
    assert plan.fits(), (
        f"{preset}: peak {plan.peak_gpu / GIB:.1f} GiB GPU, {plan.peak_ram / GIB:.1f} GiB RAM"
    )


def test_plan_command_json_has_peaks_and_phases(capsys):
    status = main(
        [
            "plan",
            "--config",
            str(REPO / "configs/dev-brand.yaml"),
            "--gpu-memory",
            "24",
            "--ram",
            "64",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert status == 0 and out["fits"] and out["peak_gpu_gib"] < 24
    assert {"peak_gpu_gib", "peak_ram_gib", "phases"} <= set(out)
    phases = {p["name"]: p for p in out["phases"]}
    assert phases["train step"]["gpu_parts_gib"]["weights"] == pytest.approx(
        32.22e9 * 0.516 / GIB, rel=0.05
    )
    assert max(p["gpu_gib"] for p in out["phases"]) == out["peak_gpu_gib"]


def test_a_config_that_does_not_fit_gets_the_peak_the_card_and_a_fix_that_fits(capsys):
    preset = str(REPO / "configs/klein-4b-style.yaml")
    assert (
        main(
            [
                "plan",
                "--config",
                preset,
                "--gpu-memory",
                "12",
                "--ram",
                "64",
                "train.gradient_checkpointing=false",
            ]
        )
        == 1
    )
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("does not fit: planned peak") and "on a 12.0 GiB GPU" in out
    assert out.endswith("cheapest fix: train.gradient_checkpointing=true")
    # two phases too big for 8 GiB (text encoder, training step): the fix names every change, and it fits
    assert main(["plan", "--config", preset, "--gpu-memory", "8", "--ram", "64"]) == 1
    fix = capsys.readouterr().out.strip().rsplit("cheapest fix: ", 1)[1]
    assert (
        main(["plan", "--config", preset, "--gpu-memory", "8", "--ram", "64", *fix.split(", ")])
        == 0
    ), fix
    assert "fits: peak" in capsys.readouterr().out


def test_quantized_weight_only_without_checkpointing_raises_the_plan_and_says_so():
    base = resolve_base_model(ModelConfig(path=HUB["klein-4b"]))
    plans = {
        (q, ck): plan_training(
            _config(
                model__path=HUB["klein-4b"],
                model__dtype="bfloat16",
                model__quantize=q,
                train__gradient_checkpointing=ck,
            ),
            base,
            gpu_memory=80,
            ram=256,
        )
        for q in ("none", "int8")
        for ck in (False, True)
    }
    # dequantised copies kept for backward
    assert plans["int8", False].peak_gpu > plans["none", False].peak_gpu
    assert plans["int8", True].peak_gpu < plans["none", True].peak_gpu
    assert any("pair it with train.gradient_checkpointing" in n for n in plans["int8", False].notes)


def test_train_refuses_a_config_that_cannot_fit_before_loading(
    capsys, tiny_models, sample_data, tmp_path
):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    args = train_args(
        tiny_models["klein"],
        sample_data,
        tmp_path / "out",
        tmp_path / "cache",
        memory__gpu_memory=0.5,
    )
    assert main(["train", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "does not fit: planned peak" in err and "0.5 GiB GPU" in err
    ), err
    assert not (tmp_path / "cache").exists()  # refused before any encoder ran
    assert (
        main(["train", "--config", str(config), *args, "--skip-memory-check", "--no-progress"]) == 0
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.quantize=nf4"], "model.quantize: nf4 (bitsandbytes) runs on a CUDA GPU only"),
        (
            ["model.text_encoder_quantize=nf4"],
            "model.text_encoder_quantize: nf4 (bitsandbytes) runs on a CUDA GPU only",
        ),
        (
            ["model.quantize=int8", "lora.type=lokr"],
            "lora.type: lokr wraps plain Linear layers only",
        ),
        (["model.fp8_storage=true"], "use model.quantize: fp8"),
    ],
)
def test_bad_quantization_settings_fail_in_one_line(
    capsys, tiny_models, sample_data, tmp_path, overrides, message
):
    if torch.cuda.is_available() and "nf4" in overrides[0]:
        pytest.skip("nf4 runs on this machine")
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    args = train_args(tiny_models["klein"], sample_data, tmp_path / "out", tmp_path / "cache")
    assert main(["train", "--config", str(config), *args, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_int8_without_torchao_and_negative_sizes_are_refused(capsys, monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name == "torchao":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert quantize_problem("int8", "model.quantize", "cpu") == (
        "model.quantize: int8 needs torchao >= 0.15.0, which is not installed: pip install -U 'flux2-lora[quant]'"
    )
    monkeypatch.undo()
    assert (
        main(["plan", "--config", str(REPO / "configs/dev-brand.yaml"), "--gpu-memory", "-3"]) == 2
    )
    assert (
        capsys.readouterr().err.strip() == "error: --gpu-memory must be a positive number, got -3"
    )
    with pytest.raises(UserError, match="'memory.gpu_memory' must be > 0"):
        _config(model__path=HUB["dev"], memory__gpu_memory=-1)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "fp8"])
def test_quantized_base_and_text_encoder_train_and_the_lora_loads_in_the_stock_pipeline(
    quantize, tiny_models, sample_data, tmp_path
):
    from diffusers import Flux2KleinPipeline

    from trainer.recipe import run

    cache = tmp_path / "cache"
    result = run(
        load_config(
            None,
            train_args(
                tiny_models["klein"],
                sample_data,
                tmp_path / "out",
                cache,
                train__steps=3,
                model__dtype="bfloat16",
                train__mixed_precision="bf16",
                train__gradient_checkpointing=True,
                model__quantize=quantize,
                model__text_encoder_quantize=quantize,
            ),
        ),
        show_progress=False,
    )
    base_layer = result.transformer.transformer_blocks[0].attn.to_q.base_layer
    assert (
        type(base_layer.weight).__name__ == {"int8": "Int8Tensor", "fp8": "Float8Tensor"}[quantize]
    )
    assert result.text_encoder_calls > 0
    pipe = Flux2KleinPipeline.from_pretrained(tiny_models["klein"])
    pipe.load_lora_weights(result.lora_path)
    assert pipe.transformer.peft_config
    # quantised embeddings live apart from full-precision ones: a full-precision run encodes again
    again = run(
        load_config(
            None,
            train_args(tiny_models["klein"], sample_data, tmp_path / "out2", cache, train__steps=1),
        ),
        show_progress=False,
    )
    assert again.text_encoder_calls > 0
    assert len(list((cache / CACHE_FORMAT / "text").iterdir())) == 2  # one folder per setting


_RSS_PROBE = """
import json, sys, threading, time
import torch
from diffusers import Flux2Transformer2DModel
from inference.quantize import diffusers_config

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak, done = [anon()], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

thread = threading.Thread(target=sample)
thread.start()
before = anon()
model = Flux2Transformer2DModel.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16, device_map="cpu",
                                                quantization_config=diffusers_config("int8", torch.bfloat16))
done.append(1)
thread.join()
print(json.dumps({"transient": peak[0] - anon(), "kept": anon() - before}))
"""


@pytest.mark.slow
def test_loading_int8_holds_the_quantised_model_plus_one_shard_not_the_bf16_model(tmp_path):
    """Slices of klein-4B at real width with 1 and 3 single blocks (one block per shard): what loading keeps
    grows by the int8 size of the added blocks, and the transient above it does not grow with the model."""
    results, sizes = {}, {}
    for blocks in (1, 3):
        config = {
            "_class_name": "Flux2Transformer2DModel",
            "num_layers": 1,
            "num_single_layers": blocks,
            "num_attention_heads": 24,
            "attention_head_dim": 128,
            "joint_attention_dim": 7680,
            "guidance_embeds": False,
        }
        model = empty_transformer(config).to_empty(device="cpu").to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.01)
        sizes[blocks] = sum(p.numel() for p in model.parameters()) * 2
        model.save_pretrained(tmp_path / f"slice{blocks}", max_shard_size="300MB")
        del model
        out = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE, str(tmp_path / f"slice{blocks}")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=HANG,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        results[blocks] = json.loads(out.stdout.strip().splitlines()[-1])
    added_bf16 = sizes[3] - sizes[1]
    # int8: half of bf16
    assert results[3]["kept"] - results[1]["kept"] == pytest.approx(added_bf16 / 2, rel=0.1)
    assert results[3]["transient"] == pytest.approx(
        results[1]["transient"], rel=0.15, abs=40 * 2**20
    )
    assert results[3]["transient"] < sizes[3] / 2  # never the whole bf16 model at once


def test_docs_memory_table_is_the_planners():
    text = (REPO / "docs/memory.md").read_text()
    begin, end = (
        "<!-- planned table: flux2-lora plan --table -->\n",
        "\n<!-- end of planned table -->",
    )
    assert text[text.index(begin) + len(begin) : text.index(end)] == memory_table(), (
        "docs/memory.md is stale: regenerate its table with `flux2-lora plan --table`"
    )


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_torchao_transients_are_planned_within_10_percent(kind):
    """What flux2-lora rehearse found the plan missing (dev at real width with int8: its text encoder 1.9x and its
    load 1.3x over plan): converting a Linear as the model loads, and dequantising it in a no-grad forward, measured
    on klein-4B's largest layer (a single block's fused projection, 27648 x 3072)."""
    from torchao.quantization import quantize_

    from inference.quantize import torchao_type
    from trainer.memory import _converting, _forward_dequantised
    from trainer.rehearse import tensor_peak

    layer = torch.nn.Linear(3072, 27648, bias=False, dtype=torch.bfloat16)
    with tensor_peak() as converting:
        quantize_(layer, torchao_type(kind))
    with torch.no_grad(), tensor_peak() as forward:
        layer(torch.randn(16, 3072, dtype=torch.bfloat16))
    planned = _converting(layer.weight.numel(), kind, 2)["converting one layer"]
    assert converting[0] == pytest.approx(planned, rel=0.10)
    planned = _forward_dequantised(layer.weight.numel(), kind, 2)["dequantised layer"]
    assert forward[0] == pytest.approx(planned, rel=0.10)
