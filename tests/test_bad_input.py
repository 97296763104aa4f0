"""Mistakes a new user made that used to slip through (a crash, a silent wrong result or a broken promise): each
now ends in one line, or runs with one warning, and nothing wrong is written."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from flux2_lora import main
from helpers import HANG, REPO, train_args
from inference.generate import _flat_or_broken
from trainer.config import load_config
from trainer.recipe import run


def _one_error(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture(scope="module")
def lora(tiny_models, sample_data, shared_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = load_config(
        None, train_args(tiny_models["klein"], sample_data, out, shared_cache, train__steps=2)
    )
    return run(cfg, show_progress=False).lora_path


def _damaged(lora, path, change) -> str:
    """A copy of `lora` with `change(tensors)` applied, header kept."""
    with safe_open(lora, "pt") as fh:
        header, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=header)
    return str(path)


def _generate(model, out, *extra) -> list[str]:
    return [
        "generate",
        "--model",
        str(model),
        "--steps",
        "1",
        "--width",
        "32",
        "--height",
        "32",
        "--out",
        str(out),
        *extra,
    ]


def test_a_bad_jsonl_field_fails_its_line_and_the_others_run(tiny_models, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"prompt": "a"},
        {"prompt": "b", "seed": "abc"},
        {"prompt": "c", "stepz": 2},
        {"prompt": "d", "steps": 0},
        {"prompt": "e", "num_images": 2},
    ]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines) + "not json\n")
    assert main(_generate(tiny_models["klein"], tmp_path / "out", "--prompts", str(jobs))) == 1
    err = capsys.readouterr().err
    assert f"error: {jobs} line 2: 'seed' must be int, got 'abc'" in err
    assert f"error: {jobs} line 3: 'stepz' is unknown; did you mean 'steps'?" in err
    assert f"error: {jobs} line 4: 'steps' must be > 0, got 0" in err
    assert f"error: {jobs} line 6: not JSON" in err
    results = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert [json.loads(r)["prompt"] for r in results] == ["a", "e", "e"]  # lines 1 and 5 ran
    assert (tmp_path / "out" / "grid.png").is_file()


def test_steps_zero_is_refused_not_read_as_the_default(tiny_models, tmp_path, capsys):
    err = _one_error(
        capsys, [*_generate(tiny_models["klein"], tmp_path / "o"), "--prompt", "x", "--steps", "0"]
    )
    assert err == "error: option '--steps' must be > 0, got 0"
    assert not (tmp_path / "o").exists()


def test_one_image_still_gets_its_grid(tiny_models, tmp_path, capsys):
    assert main([*_generate(tiny_models["klein"], tmp_path / "o"), "--prompt", "x"]) == 0
    assert (tmp_path / "o" / "grid.png").is_file()  # the README: grid.png shows them together


@pytest.mark.parametrize("scale", ["nan", "inf", "1e9", "-101"])
def test_a_scale_that_cannot_work_is_refused_before_loading(
    tiny_models, lora, tmp_path, capsys, scale
):
    err = _one_error(
        capsys,
        [
            *_generate(tiny_models["klein"], tmp_path / "o"),
            "--prompt",
            "x",
            "--lora",
            f"{lora}:{scale}",
        ],
    )
    assert "the scale must be a finite number between -100 and 100" in err
    assert not (tmp_path / "o").exists()


def test_a_lora_holding_nan_is_refused_naming_the_tensor(tiny_models, lora, tmp_path, capsys):
    def poison(t):
        key = next(k for k in sorted(t) if k.endswith("lora_B.weight"))
        t[key][0, 0] = float("nan")

    bad = _damaged(lora, tmp_path / "nan.safetensors", poison)
    err = _one_error(
        capsys, [*_generate(tiny_models["klein"], tmp_path / "o"), "--prompt", "x", "--lora", bad]
    )
    assert "lora_B.weight holds NaN or infinite values" in err and "nan.safetensors" in err
    assert not (tmp_path / "o").exists()


def test_a_lora_whose_ranks_disagree_is_refused_in_one_line(tiny_models, lora, tmp_path, capsys):
    def widen(t):
        key = next(k for k in sorted(t) if k.endswith("lora_A.weight"))
        t[key] = torch.randn(t[key].shape[0] + 2, t[key].shape[1])

    bad = _damaged(lora, tmp_path / "shape.safetensors", widen)
    err = _one_error(
        capsys, [*_generate(tiny_models["klein"], tmp_path / "o"), "--prompt", "x", "--lora", bad]
    )
    assert "is damaged" in err and "lora_A of rank 6 and lora_B of rank 4" in err


def test_pixels_that_overflow_are_never_saved(tiny_models, lora, tmp_path, capsys):
    def blow_up(t):  # finite tensors whose product overflows float32 inside the model
        for k in t:
            if k.endswith("lora_B.weight"):
                t[k] = torch.full_like(t[k], 1e30)

    bad = _damaged(lora, tmp_path / "huge.safetensors", blow_up)
    err = _one_error(
        capsys, [*_generate(tiny_models["klein"], tmp_path / "o"), "--prompt", "x", "--lora", bad]
    )
    assert "gave NaN or infinite pixels" in err and "nothing was written" in err
    assert not (tmp_path / "o").exists()


def test_broken_and_flat_pictures_are_told_apart():
    assert _flat_or_broken(np.full((4, 4, 3), np.nan)) == "non-finite"
    assert _flat_or_broken(np.zeros((4, 4, 3))) == "flat"
    assert _flat_or_broken(np.random.default_rng(0).random((4, 4, 3))) is None


def test_a_batch_no_bucket_can_fill_is_refused(tiny_models, sample_data, tmp_path, capsys):
    args = train_args(
        tiny_models["klein"], sample_data, tmp_path / "r", tmp_path / "c", train__batch_size=100
    )
    (tmp_path / "c.yaml").write_text("{}\n")
    err = _one_error(capsys, ["train", "--config", str(tmp_path / "c.yaml"), *args])
    assert "train.batch_size 100 is more than any bucket holds: the largest has 6 of the 6" in err
    assert "set train.batch_size=6 or lower" in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_plan_refuses_a_gpu_size_that_is_not_a_number(capsys, value):
    config = str(REPO / "configs" / "klein-4b-style.yaml")
    err = _one_error(capsys, ["plan", "--config", config, f"--gpu-memory={value}"])
    assert err == f"error: --gpu-memory must be a positive number, got {value}"


def test_non_finite_config_numbers_are_refused(capsys):
    err = _one_error(
        capsys,
        ["show-config", "--config", str(REPO / "configs" / "quickstart.yaml"), "optim.lr=.nan"],
    )
    assert err == "error: config key 'optim.lr' must be a finite number, got nan"


def test_plan_of_the_multi_gpu_preset_plans_its_gpus_and_offers_nothing_already_set(capsys):
    preset = str(REPO / "configs" / "dev-multi-gpu.yaml")
    assert main(["plan", "--config", preset, "--gpu-memory", "40", "--ram", "320"]) == 0
    assert "4 processes" in capsys.readouterr().out
    assert main(["plan", "--config", preset, "--gpu-memory", "20", "--ram", "320"]) == 1
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    # already sharded: never "set train.sharding: fsdp"; and nothing sharding refuses (quantize, offload)
    assert (
        "train.sharding" not in verdict
        and "model.quantize" not in verdict
        and "group_offload" not in verdict
    )
    style = str(REPO / "configs" / "klein-9b-product.yaml")  # sets gradient checkpointing itself
    assert main(["plan", "--config", style, "--gpu-memory", "16"]) == 1
    assert "gradient_checkpointing" not in capsys.readouterr().out.strip().splitlines()[-1]


def test_the_model_card_loads_the_base_the_run_used(lora):
    card = (lora.parent / "README.md").read_text()
    base = json.loads(
        (lora.parent / "config.yaml").read_text().split("path: ", 1)[1].split("\n")[0].join('""')
    )
    assert (
        f'from_pretrained("{base}"' in card
        and "tiny-model --family" not in card.split("```python")[1]
    )


@pytest.mark.slow
def test_commands_print_no_library_deprecation_noise():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flux2_lora",
            "plan",
            "--config",
            str(REPO / "configs" / "dev-brand.yaml"),
            "--gpu-memory",
            "24",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert proc.returncode == 0 and "register_constant" not in proc.stderr, proc.stderr


def _caption_source(root, captions: dict[str, bytes]):
    root.mkdir()
    for i, (name, raw) in enumerate(captions.items()):
        Image.new("RGB", (128, 128), ["red", "blue", "green"][i]).save(root / f"{name}.png")
        (root / f"{name}.txt").write_bytes(raw)
    return root


def test_prepare_reads_byte_order_marks_and_exits_non_zero_on_errors(tmp_path, capsys):
    src = _caption_source(
        tmp_path / "src",
        {
            "bom": "\ufeffa red square".encode(),
            "utf16": "a blue square".encode("utf-16"),  # Windows Notepad's "Unicode"
            "latin1": "caf\xe9".encode("latin-1"),
        },
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "prepare",
                str(src),
                "--out",
                str(out),
                "--trigger",
                "zxq",
                "--fix",
                "--resolution",
                "128",
                "--no-progress",
            ]
        )
        == 1
    )
    assert "(1 errors" in capsys.readouterr().out
    texts = {
        json.loads(r)["source"]: json.loads(r)["text"]
        for r in (out / "metadata.jsonl").read_text().splitlines()
    }
    assert texts["bom.png"] == "zxq, a red square" and texts["utf16.png"] == "zxq, a blue square"


def test_training_reads_the_same_captions(tiny_models, tmp_path):
    from data_tools.dataset import DataConfig, load_samples

    src = _caption_source(
        tmp_path / "src", {"bom": "\ufeffzxq red".encode(), "utf16": "zxq blue".encode("utf-16")}
    )
    captions = sorted(s.caption for s in load_samples(DataConfig(path=str(src)), 64))
    assert captions == ["zxq blue", "zxq red"]
