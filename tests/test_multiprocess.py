"""A real 2-process data-parallel run (gloo on CPU): every rank ends with the same LoRA, rank 0 writes."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import HANG, REPO, train_args


@pytest.mark.slow
def test_two_process_run_agrees_across_ranks(tiny_models, sample_data, shared_cache, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    out = tmp_path / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # a free port: a fixed one collides with any other run on the machine
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(REPO / "train.py"),
        "--config",
        str(config),
        "--no-progress",
        *train_args(
            tiny_models["klein"],
            sample_data,
            out,
            shared_cache,
            train__steps=8,
            checkpoint__every=4,
        ),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stderr + proc.stdout
    assert "all 2 ranks hold identical LoRA weights" in said
    # one summary, not one per rank
    assert said.count("ready to train") == 1 and said.count("LoRA written to") == 1, said[-3000:]
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(torch.count_nonzero(v) for k, v in lora.items() if "lora_B" in k)  # it trained
    # one checkpoint with both ranks' RNG states, written once
    step4 = out / "checkpoints" / "step-4"
    assert sorted(p.name for p in step4.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert not list((out / "checkpoints").glob(".tmp-*"))
