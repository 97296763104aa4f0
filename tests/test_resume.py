"""Checkpoints: a run killed with SIGKILL and resumed ends bit-identical to one never interrupted;
SIGTERM saves a checkpoint at the next step boundary and exits 143."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import HANG, REPO, train_args
from trainer.checkpoints import list_checkpoints
from trainer.config import load_config
from trainer.recipe import run

STEPS = 80


def _args(tiny_models, sample_data, cache, out):
    # logit-normal sampling, caption dropout, accumulation and a cosine schedule all draw on state that resume
    # has to restore or re-derive exactly
    return train_args(
        tiny_models["klein"],
        sample_data,
        out,
        cache,
        train__steps=STEPS,
        checkpoint__every=10,
        checkpoint__keep_last=2,
        train__gradient_accumulation=2,
        train__caption_dropout=0.3,
        optim__scheduler="cosine",
        optim__warmup_steps=5,
        lora__dropout=0.1,
    )


def _launch(args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    config = args[0]
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--config", config, "--no-progress", *args[1:]],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(out, proc, at_least, timeout=HANG):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [int(p.name[5:]) for p in list_checkpoints(out)]
        if done and max(done) >= at_least:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before a checkpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tiny_models, sample_data, shared_cache, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    straight = run(
        load_config(None, _args(tiny_models, sample_data, shared_cache, tmp_path / "straight")),
        show_progress=False,
    )

    out = tmp_path / "killed"
    proc = _launch([str(empty), *_args(tiny_models, sample_data, shared_cache, out)])
    _wait_for_checkpoint(out, proc, 20)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert len(list_checkpoints(out)) <= 2  # keep_last
    resumed = run(
        load_config(None, [*_args(tiny_models, sample_data, shared_cache, out), "resume=latest"]),
        show_progress=False,
    )

    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tiny_models, sample_data, shared_cache, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    out = tmp_path / "run"
    args = train_args(tiny_models["klein"], sample_data, out, shared_cache, train__steps=100000)
    proc = _launch([str(empty), *args])
    deadline = time.time() + HANG
    # written just before the loop
    while not (out / "config.yaml").exists() and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    saved = list_checkpoints(out)
    assert len(saved) == 1 and int(saved[0].name[5:]) > 0
    assert (saved[0] / "pytorch_lora_weights.safetensors").is_file()


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            found.append(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_the_trainer_with_a_checkpoint(
    tiny_models, sample_data, shared_cache, tmp_path
):
    """A scheduler's SIGTERM reaches `accelerate launch`, which exits at once: the trainer must not run on alone."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    out = tmp_path / "run"
    args = train_args(tiny_models["klein"], sample_data, out, shared_cache, train__steps=100000)
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "-q",
            "--config_file",
            str(REPO / "configs" / "accelerate" / "default.yaml"),
            str(REPO / "train.py"),
            "--config",
            str(empty),
            "--no-progress",
            *args,
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + HANG
    # written just before the loop
    while not (out / "config.yaml").exists() and time.time() < deadline:
        assert launcher.poll() is None
        time.sleep(0.05)
    [trainer] = _children(launcher.pid)
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=HANG)
    deadline = time.time() + HANG
    while _alive(trainer) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(trainer), "the trainer outlived its launcher"
    saved = list_checkpoints(out)
    assert len(saved) == 1 and (saved[0] / "pytorch_lora_weights.safetensors").is_file()
