"""Bad input ends in one clear line, exit code 2, no traceback, and nothing half-written."""

import subprocess
import sys

import pytest
from PIL import Image

from flux2_lora import main
from helpers import HANG, REPO, train_args


def _fails(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    return str(path)


def _train(capsys, config, tiny_models, sample_data, tmp_path, **extra):
    args = train_args(
        tiny_models["klein"], sample_data, tmp_path / "out", tmp_path / "cache", **extra
    )
    return _fails(capsys, ["train", "--config", config, *args])


def test_missing_model_path(capsys, config, tiny_models, sample_data, tmp_path):
    err = _train(
        capsys, config, tiny_models, sample_data, tmp_path, model__path=tmp_path / "nowhere"
    )
    assert "nowhere" in err and "no such folder" in err


def test_folder_that_is_not_a_model(capsys, config, tiny_models, sample_data, tmp_path):
    err = _train(capsys, config, tiny_models, sample_data, tmp_path, model__path=sample_data)
    assert "has no model_index.json" in err


def test_family_mismatch(capsys, config, tiny_models, sample_data, tmp_path):
    err = _train(capsys, config, tiny_models, sample_data, tmp_path, model__family="dev")
    assert (
        "model.family is 'dev'" in err and "klein model" in err and "set model.family: klein" in err
    )


def test_empty_data_folder(capsys, config, tiny_models, sample_data, tmp_path):
    (tmp_path / "empty").mkdir()
    err = _train(capsys, config, tiny_models, sample_data, tmp_path, data__path=tmp_path / "empty")
    assert "holds no images" in err


def test_image_without_caption_and_trigger_only_option(capsys, config, tiny_models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), "red").save(data / "a.png")
    err = _train(capsys, config, tiny_models, data, tmp_path)
    assert "a.png' has no caption" in err and "data.missing_caption: trigger" in err
    args = train_args(
        tiny_models["klein"],
        data,
        tmp_path / "ok",
        tmp_path / "cache",
        train__steps=1,
        train__batch_size=1,  # one image
        data__missing_caption="trigger",
    )
    assert main(["train", "--config", config, "--no-progress", *args]) == 0


def test_caption_not_utf8(capsys, config, tiny_models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), "red").save(data / "a.png")
    (data / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "a.txt' is not UTF-8" in _train(capsys, config, tiny_models, data, tmp_path)


def test_unreadable_image(capsys, config, tiny_models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"not a png")
    (data / "a.txt").write_text("x")
    assert "a.png' cannot be read" in _train(capsys, config, tiny_models, data, tmp_path)


def test_output_dir_holding_another_run_is_refused(
    capsys, config, tiny_models, sample_data, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("old run")
    err = _train(capsys, config, tiny_models, sample_data, tmp_path)
    assert "already holds a run" in err and "output.overwrite: true" in err
    assert (out / "config.yaml").read_text() == "old run"  # nothing touched


def test_unwritable_output(capsys, config, tiny_models, sample_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _train(capsys, config, tiny_models, sample_data, tmp_path, output__dir=blocker / "sub")
    assert "output.dir" in err and "not writable" in err


def test_resume_without_checkpoint(capsys, config, tiny_models, sample_data, tmp_path):
    err = _train(capsys, config, tiny_models, sample_data, tmp_path, resume="latest")
    assert "holds no checkpoint" in err
    assert not (tmp_path / "out").exists()  # the refused run leaves no empty output folder behind


def test_mistyped_local_model_path_is_named_at_once(
    capsys, config, tiny_models, sample_data, tmp_path, monkeypatch
):
    # "tiny-klein" is here; "tiny-klien" looks like owner/name
    monkeypatch.chdir(tiny_models["klein"].parent)
    err = _train(capsys, config, tiny_models, sample_data, tmp_path, model__path="./tiny-klien")
    assert err.startswith("error: model.path './tiny-klien': no such folder (did you mean")
    (tiny_models["klein"].parent / "runs").mkdir(exist_ok=True)
    err = _train(capsys, config, tiny_models, sample_data, tmp_path, model__path="runs/tiny-klein")
    # its first folder exists: no hub lookup
    assert "model.path 'runs/tiny-klein': no such folder" in err


def test_every_data_problem_is_reported_in_one_run(capsys, config, tiny_models, tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    for name in ("good", "nocaption", "latin1", "broken", "truncated"):
        Image.new("RGB", (64, 64), "red").save(data / f"{name}.png")
        (data / f"{name}.txt").write_text("zxq")
    (data / "nocaption.txt").unlink()
    (data / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (data / "broken.png").write_bytes(b"not a png")
    whole = (data / "good.png").read_bytes()
    (data / "truncated.png").write_bytes(whole[: len(whole) // 2])
    err = _train(capsys, config, tiny_models, data, tmp_path)
    assert (
        "4 of 5 images cannot be trained on" in err
        and "and 1 more" in err
        and "flux2-lora prepare" in err
    )
    for name in ("broken.png", "latin1.txt", "nocaption.png"):  # sorted: the first three named
        assert name in err


def test_wandb_without_login_is_refused_before_caching(
    capsys, config, tiny_models, sample_data, tmp_path, monkeypatch
):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    err = _train(capsys, config, tiny_models, sample_data, tmp_path, output__report_to="wandb")
    assert "wandb has no login here" in err and "WANDB_MODE=offline" in err
    assert "add output.report_to=none to the command" in err  # a copy-paste override
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_fp16_on_cpu(capsys, config, tiny_models, sample_data, tmp_path):
    err = _train(capsys, config, tiny_models, sample_data, tmp_path, train__mixed_precision="fp16")
    assert "fp16 needs a CUDA GPU" in err


@pytest.mark.slow
def test_accelerate_launch_prints_one_line_without_traceback(tmp_path):
    """`accelerate launch` adds a launcher traceback for any failing script unless given -q (README uses -q)."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: {path: m}\ndata: {path: d}\noptim: {lr: 0}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "-q",
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(REPO / "train.py"),
            "--config",
            str(cfg),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert proc.returncode != 0
    assert (
        proc.stderr.strip().splitlines()[-1] == "error: config key 'optim.lr' must be > 0, got 0.0"
    )
    assert "Traceback" not in proc.stderr


def test_every_option_of_every_command_has_help():
    import argparse

    from flux2_lora import TABLE, build_parser

    for name in TABLE:
        parser = build_parser([name])
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
            name
        ]
        bare = [a.option_strings or a.dest for a in sub._actions if not a.help]
        assert not bare, f"{name}: {bare}"
        text = " ".join(sub.format_help().split())
        if name == "prepare":
            assert "(default: 1024)" in text and "(default: #FFFFFF)" in text
        if name == "generate":
            assert "(default: auto)" in text and "(default: 0)" in text


@pytest.mark.slow
def test_hub_retries_are_printed_once():
    code = (
        "from common.commands import quiet_libraries; quiet_libraries(); import logging; "
        "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=HANG
    )
    assert proc.stderr.count("Retrying in 1s") == 1, proc.stderr


def test_a_distilled_checkpoint_is_refused_unless_allowed(capsys, config, sample_data, tmp_path):
    distilled = tmp_path / "distilled"
    assert main(["tiny-model", str(distilled), "--family", "klein", "--distilled"]) == 0
    capsys.readouterr()
    args = train_args(distilled, sample_data, tmp_path / "out", tmp_path / "cache", train__steps=1)
    err = _fails(capsys, ["train", "--config", config, *args])
    assert (
        "is a step-distilled FLUX.2 klein checkpoint" in err
        and "model.allow_distilled: true" in err
    )
    assert not (tmp_path / "out").exists()
    assert (
        main(["train", "--config", config, "--no-progress", *args, "model.allow_distilled=true"])
        == 0
    )
