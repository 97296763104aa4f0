"""Loop options on a real tiny run: bf16 autocast, gradient checkpointing, accumulation, trackers, NaN policy."""


import pytest
import torch
from helpers import train_args

from common.errors import UserError
from trainer.config import load_config
from trainer.recipe import run


def test_bf16_checkpointing_accumulation_and_tensorboard(tiny_models, sample_data, shared_cache, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    cfg = load_config(None, train_args(tiny_models["dev"], sample_data, out, shared_cache, train__steps=3,
                                       train__mixed_precision="bf16", train__gradient_checkpointing=True,
                                       train__gradient_accumulation=2, output__report_to="tensorboard",
                                       optim__scheduler="linear", lora__targets="all_linear"))
    result = run(cfg, show_progress=False)
    assert result.lora_path.is_file()
    assert any((out / "logs").rglob("events.out.tfevents.*"))
    assert any("proj_out" in n for n, p in result.transformer.named_parameters() if p.requires_grad)


def test_wandb_offline(tiny_models, sample_data, shared_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    cfg = load_config(None, train_args(tiny_models["klein"], sample_data, out, shared_cache, train__steps=2,
                                       output__report_to="wandb", sample__every=2, sample__steps=1)
                      + ["sample.prompts=['zxq logo']"])
    run(cfg, show_progress=False)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert list(run_dir.rglob("*.wandb"))
    assert list(run_dir.rglob("media/images/samples_*.png"))  # the sample grid went to wandb too


def test_attention_preset_targets_only_attention(tiny_models, sample_data, shared_cache, tmp_path):
    cfg = load_config(None, train_args(tiny_models["klein"], sample_data, tmp_path / "r", shared_cache,
                                       train__steps=1, lora__targets="attention"))
    names = [n for n, p in run(cfg, show_progress=False).transformer.named_parameters() if p.requires_grad]
    assert any(".attn.to_q." in n for n in names) and any("to_qkv_mlp_proj" in n for n in names)
    assert not any(".ff." in n or "ff_context" in n for n in names)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_names_the_files(policy, tiny_models, sample_data, shared_cache, tmp_path, caplog):
    # an lr of 1e30 drives the weights to inf after the first update: a real divergence, not a mock
    cfg = load_config(None, train_args(tiny_models["klein"], sample_data, tmp_path / "r", shared_cache,
                                       train__steps=4, optim__lr=1e30, train__max_grad_norm=0,
                                       train__nonfinite=policy))
    if policy == "stop":
        with pytest.raises(UserError, match=r"non-finite loss at step \d+ on .*mark_\d+\.png"):
            run(cfg, show_progress=False)
    else:
        result = run(cfg, show_progress=False)
        assert "batch skipped" in caplog.text and "mark_" in caplog.text
        assert result.lora_path.is_file()


def test_low_memory_path_fp8_storage_and_group_offload(tiny_models, sample_data, shared_cache, tmp_path):
    """The dev-on-24GB preset's path: float8 frozen weights + block offload, LoRA still float32 and trained."""
    cfg = load_config(None, train_args(tiny_models["dev"], sample_data, tmp_path / "r", shared_cache, train__steps=3,
                                       model__fp8_storage=True, model__group_offload="block",
                                       train__gradient_checkpointing=True))
    result = run(cfg, show_progress=False)
    block = result.transformer.transformer_blocks[0].attn.to_q
    assert block.base_layer.weight.dtype == torch.float8_e4m3fn
    assert block.lora_A["default"].weight.dtype == torch.float32
    assert torch.count_nonzero(block.lora_B["default"].weight) > 0


@pytest.mark.parametrize("family", ["klein", "dev"])
def test_samples_during_training_and_before_after_grid(family, tiny_models, sample_data, shared_cache, tmp_path):
    from PIL import Image

    out = tmp_path / "r"
    prompts = ["zxq logo on white", "a red circle"]
    args = train_args(tiny_models[family], sample_data, out, shared_cache, train__steps=4, sample__every=2,
                      sample__steps=2, sample__width=64, sample__height=48)
    cfg = load_config(None, args + [f"sample.prompts={prompts}"])
    run(cfg, show_progress=False)
    grids = sorted(p.name for p in (out / "samples").glob("step-*.png"))
    assert grids == ["step-000002.png", "step-000004.png"]
    assert Image.open(out / "samples" / "step-000002.png").width >= 2 * 64
    assert Image.open(out / "samples" / "before_after.png").height > Image.open(out / "samples" / "step-000004.png").height
