"""Loop options on a real tiny run: bf16 autocast, gradient checkpointing, accumulation, trackers, NaN policy."""

import pytest
import torch

from common.errors import UserError
from helpers import train_args
from inference.families import FAMILIES
from trainer.config import load_config
from trainer.recipe import run


def test_bf16_checkpointing_accumulation_and_tensorboard(
    tiny_models, sample_data, shared_cache, tmp_path, monkeypatch
):
    """Each option's effect, watched on the first block: bf16 autocast runs it in bfloat16, checkpointing runs its
    forward again in backward, accumulation makes two micro-batches a step."""
    import trainer.recipe

    pytest.importorskip("tensorboard")
    seen = []
    setup_model = trainer.recipe._setup_model

    def watched(*args):
        transformer = setup_model(*args)
        # a layer inside the block: the checkpoint recomputes the block's forward, which its own hooks do not see
        transformer.transformer_blocks[0].ff.register_forward_hook(
            lambda m, i, o: seen.append(o.dtype)
        )
        return transformer

    monkeypatch.setattr(trainer.recipe, "_setup_model", watched)
    out = tmp_path / "run"
    cfg = load_config(
        None,
        train_args(
            tiny_models["dev"],
            sample_data,
            out,
            shared_cache,
            train__steps=3,
            train__mixed_precision="bf16",
            train__gradient_checkpointing=True,
            train__gradient_accumulation=2,
            output__report_to="tensorboard",
            optim__scheduler="linear",
            lora__targets="all_linear",
        ),
    )
    result = run(cfg, show_progress=False)
    assert result.lora_path.is_file()
    assert set(seen) == {torch.bfloat16}  # autocast
    assert (
        len(seen) == 3 * 2 * 2
    )  # 3 steps x 2 micro-batches x (forward + its recompute in backward)
    assert result.transformer.is_gradient_checkpointing
    assert any((out / "logs").rglob("events.out.tfevents.*"))
    assert any("proj_out" in n for n, p in result.transformer.named_parameters() if p.requires_grad)


def test_wandb_offline(tiny_models, sample_data, shared_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    cfg = load_config(
        None,
        train_args(
            tiny_models["klein"],
            sample_data,
            out,
            shared_cache,
            train__steps=2,
            output__report_to="wandb",
            sample__every=2,
            sample__steps=1,
        )
        + ["sample.prompts=['zxq logo']"],
    )
    run(cfg, show_progress=False)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert list(run_dir.rglob("*.wandb"))
    assert list(run_dir.rglob("media/images/samples_*.png"))  # the sample grid went to wandb too


def test_attention_preset_targets_only_attention(tiny_models, sample_data, shared_cache, tmp_path):
    cfg = load_config(
        None,
        train_args(
            tiny_models["klein"],
            sample_data,
            tmp_path / "r",
            shared_cache,
            train__steps=1,
            lora__targets="attention",
        ),
    )
    names = [
        n
        for n, p in run(cfg, show_progress=False).transformer.named_parameters()
        if p.requires_grad
    ]
    assert any(".attn.to_q." in n for n in names) and any("to_qkv_mlp_proj" in n for n in names)
    assert not any(".ff." in n or "ff_context" in n for n in names)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_names_the_files(
    policy, tiny_models, sample_data, shared_cache, tmp_path, caplog
):
    # an lr of 1e30 drives the weights to inf after the first update: a real divergence, not a mock
    cfg = load_config(
        None,
        train_args(
            tiny_models["klein"],
            sample_data,
            tmp_path / "r",
            shared_cache,
            train__steps=4,
            optim__lr=1e30,
            train__max_grad_norm=0,
            train__nonfinite=policy,
        ),
    )
    if policy == "stop":
        with pytest.raises(UserError, match=r"non-finite loss at step \d+ on .*mark_\d+\.png"):
            run(cfg, show_progress=False)
    else:
        result = run(cfg, show_progress=False)
        assert "batch skipped" in caplog.text and "mark_" in caplog.text
        assert result.lora_path.is_file()


def test_low_memory_path_quantized_base_and_group_offload(
    tiny_models, sample_data, shared_cache, tmp_path
):
    """Float8 frozen weights with per-row scales + block offload, LoRA still float32 and trained."""
    cfg = load_config(
        None,
        train_args(
            tiny_models["dev"],
            sample_data,
            tmp_path / "r",
            shared_cache,
            train__steps=3,
            model__quantize="fp8",
            model__group_offload="block",
            train__gradient_checkpointing=True,
        ),
    )
    result = run(cfg, show_progress=False)
    block = result.transformer.transformer_blocks[0].attn.to_q
    assert type(block.base_layer.weight).__name__ == "Float8Tensor"
    assert block.lora_A["default"].weight.dtype == torch.float32
    assert torch.count_nonzero(block.lora_B["default"].weight) > 0


def test_samples_during_training_and_before_after_grid(
    family, tiny_models, sample_data, shared_cache, tmp_path
):
    from PIL import Image

    out = tmp_path / "r"
    prompts = ["zxq logo on white", "a red circle"]
    args = train_args(
        tiny_models[family],
        sample_data,
        out,
        shared_cache,
        train__steps=4,
        sample__every=2,
        sample__steps=2,
        sample__width=64,
        sample__height=48,
    )
    cfg = load_config(None, args + [f"sample.prompts={prompts}"])
    run(cfg, show_progress=False)
    grids = sorted(p.name for p in (out / "samples").glob("step-*.png"))
    assert grids == ["step-000002.png", "step-000004.png"]
    assert Image.open(out / "samples" / "step-000002.png").width >= 2 * 64
    assert (
        Image.open(out / "samples" / "before_after.png").height
        > Image.open(out / "samples" / "step-000004.png").height
    )


def _forward(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        hidden_states=torch.randn(1, 16, 128, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=None,
        encoder_hidden_states=torch.randn(1, 7, 48, generator=g),
        txt_ids=torch.zeros(1, 7, 4),
        img_ids=torch.zeros(1, 16, 4),
        return_dict=False,
    )
    with torch.no_grad():
        return transformer(**kw)[0]


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "loha"])
def test_every_adapter_type_trains_and_loads_in_generate(
    kind, tiny_models, sample_data, shared_cache, tmp_path
):
    from inference.generate import Generator
    from inference.lora_io import our_info, read_header

    cfg = load_config(
        None,
        train_args(
            tiny_models["klein"],
            sample_data,
            tmp_path / "r",
            shared_cache,
            train__steps=4,
            lora__type=kind,
            lora__rank=4,
            lora__alpha=4,
            optim__lr=1e-2,
        ),
    )
    result = run(cfg, show_progress=False)
    assert our_info(read_header(result.lora_path))["type"] == kind  # the file states its type
    trained = _forward(result.transformer.eval())
    gen = Generator(str(tiny_models["klein"]))
    base = _forward(gen.pipe.transformer)
    info = gen.add_adapter(result.lora_path)
    loaded = _forward(gen.pipe.transformer)
    assert (trained - base).abs().max() > 1e-4  # it learned something ...
    # ... and generate applies exactly that
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)
    gen.set_scales({info.name: 0.0})
    # DoRA's learned magnitudes stay at scale 0: only removing the adapter gives the base back
    if kind != "dora":
        torch.testing.assert_close(_forward(gen.pipe.transformer), base, atol=1e-6, rtol=1e-6)
    gen.remove_adapter(info.name)
    torch.testing.assert_close(_forward(gen.pipe.transformer), base, atol=1e-6, rtol=1e-6)
    if kind in ("lora", "dora"):  # the diffusers contract: the stock loader reproduces it too
        stock = FAMILIES["klein"].pipeline_class.from_pretrained(str(tiny_models["klein"]))
        stock.load_lora_weights(str(result.lora_path.parent))
        torch.testing.assert_close(_forward(stock.transformer), trained, atol=1e-5, rtol=1e-5)


def test_a_rank_that_does_not_fit_is_refused_before_loading(
    tiny_models, sample_data, shared_cache, tmp_path
):
    cfg = load_config(
        None,
        train_args(
            tiny_models["klein"],
            sample_data,
            tmp_path / "r",
            shared_cache,
            lora__type="lokr",
            lora__rank=64,
        ),
    )
    with pytest.raises(
        UserError, match=r"lora.rank 64 does not fit this model: .* use lora.rank <= 32"
    ):
        run(cfg, show_progress=False)
    assert not (tmp_path / "r").exists()


def test_prodigy_trains_and_resumes_its_state(tiny_models, sample_data, shared_cache, tmp_path):
    args = train_args(
        tiny_models["klein"],
        sample_data,
        tmp_path / "r",
        shared_cache,
        train__steps=4,
        optim__name="prodigy",
        optim__lr=1.0,
        checkpoint__every=2,
    )
    straight = run(load_config(None, args), show_progress=False)
    assert any(
        p.abs().sum() > 0 for n, p in straight.transformer.named_parameters() if "lora_B" in n
    )
    resumed = run(load_config(None, [*args, "resume=latest"]), show_progress=False)
    for (n, a), (_, b) in zip(
        straight.transformer.named_parameters(), resumed.transformer.named_parameters()
    ):
        assert torch.equal(a, b), n  # prodigy's own estimate (d) is in the checkpoint


@pytest.mark.parametrize(
    "override, message",
    [
        (["optim.name=adamw8bit"], "optim.name: adamw8bit runs on a CUDA GPU only"),
        (["optim.name=prodigy", "optim.lr=1e-4"], "prodigy wants optim.lr: 1.0"),
    ],
)
def test_optimizer_problems_are_found_before_loading(
    override, message, tiny_models, sample_data, shared_cache, tmp_path
):
    cfg = load_config(
        None, train_args(tiny_models["klein"], sample_data, tmp_path / "r", shared_cache) + override
    )
    with pytest.raises(UserError, match=message):
        run(cfg, show_progress=False)
    assert not (tmp_path / "r").exists()


def test_in_training_samples_leave_the_weights_dtypes_alone(
    tiny_models, sample_data, shared_cache, tmp_path
):
    """A sample grid mid-run must not cast the training transformer: bf16 frozen weights stay bf16 (a float32 copy
    doubles a real model's memory for the rest of the run), the LoRA stays float32."""
    args = train_args(
        tiny_models["klein"],
        sample_data,
        tmp_path / "r",
        shared_cache,
        train__steps=2,
        model__dtype="bfloat16",
        sample__every=1,
        sample__steps=1,
    )
    result = run(load_config(None, [*args, "sample.prompts=[zxq logo]"]), show_progress=False)
    frozen = {p.dtype for p in result.transformer.parameters() if not p.requires_grad}
    trained = {p.dtype for p in result.transformer.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert (tmp_path / "r" / "samples" / "step-000001.png").is_file()
