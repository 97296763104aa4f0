"""Sharded training (FSDP2) on 2 gloo processes: the code path a multi-GPU dev run takes, run on the CPU.

Each rank must hold half the frozen weights (measured from the tensors it stores), the run must end with the ranks
agreeing, resume must be exact, and the LoRA must load in the stock pipeline and equal what one process computes
for the same global batches (2 ranks = 1 process with 2-step gradient accumulation, by the batch plan's design).
"""

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from common.errors import UserError
from helpers import HANG, REPO, train_args
from inference.families import FAMILIES
from inference.tiny import build_tiny_pipeline
from trainer.config import load_config
from trainer.recipe import run

STEPS = dict(train__steps=6, checkpoint__every=3, train__batch_size=2, train__caption_dropout=0.2)


def _torchrun(args: list[str], cwd) -> str:
    (cwd / "empty.yaml").write_text("{}\n")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
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
        str(cwd / "empty.yaml"),
        "--no-progress",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr + proc.stdout


@pytest.mark.slow
def test_two_sharded_ranks_train_what_one_process_does(
    tiny_models, sample_data, shared_cache, tmp_path
):
    model = tiny_models["klein"]
    said = _torchrun(
        [
            *train_args(model, sample_data, tmp_path / "fsdp", shared_cache, **STEPS),
            "train.sharding=fsdp",
            "sample.prompts=[zxq logo]",
            "sample.every=3",
            "sample.steps=2",
        ],
        tmp_path,
    )
    shares = [
        float(x)
        for x in re.search(
            r"the ranks hold ([\d.]+)%, ([\d.]+)% of the frozen weights", said
        ).groups()
    ]
    assert all(45 <= s <= 55 for s in shares), said[-2000:]  # each holds half, not a replica
    assert "all 2 ranks hold identical LoRA weights" in said
    sharded = load_file(tmp_path / "fsdp" / "pytorch_lora_weights.safetensors")
    # samples render on every rank (each forward gathers blocks from all) and rank 0 writes them
    assert {p.name for p in (tmp_path / "fsdp" / "samples").iterdir()} == {
        "step-000003.png",
        "step-000006.png",
        "before_after.png",
    }

    # resume from the step-3 checkpoint (LoRA and optimizer state gathered whole, then sharded again): exact
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp" / "checkpoints", resumed_dir / "checkpoints")
    shutil.rmtree(resumed_dir / "checkpoints" / "step-6", ignore_errors=True)
    _torchrun(
        [
            *train_args(model, sample_data, resumed_dir, shared_cache, **STEPS),
            "train.sharding=fsdp",
            "resume=latest",
            "output.overwrite=true",
        ],
        tmp_path,
    )
    resumed = load_file(resumed_dir / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(resumed[k], v) for k, v in sharded.items())

    # one process, the same global batches: 2-step accumulation
    single = run(
        load_config(
            None,
            train_args(
                model,
                sample_data,
                tmp_path / "one",
                shared_cache,
                **STEPS,
                train__gradient_accumulation=2,
            ),
        ),
        show_progress=False,
    )
    alone = load_file(single.lora_path)
    assert alone.keys() == sharded.keys()
    for key, value in sharded.items():
        torch.testing.assert_close(value, alone[key], atol=1e-5, rtol=1e-4)

    # the stock loader takes the gathered file as it is
    pipe = build_tiny_pipeline(FAMILIES["klein"])
    pipe.load_lora_weights(
        str(tmp_path / "fsdp"), weight_name="pytorch_lora_weights.safetensors", adapter_name="z"
    )
    assert sum("lora_A" in n for n, _ in pipe.transformer.named_parameters()) == sum(
        "lora_A" in k for k in sharded
    )


def test_sharding_asked_of_one_process_is_refused(tiny_models, sample_data, shared_cache, tmp_path):
    with pytest.raises(
        UserError, match="train.sharding: fsdp needs 2 or more processes and this run has 1"
    ):
        run(
            load_config(
                None,
                train_args(
                    tiny_models["klein"],
                    sample_data,
                    tmp_path / "x",
                    shared_cache,
                    train__sharding="fsdp",
                ),
            ),
            show_progress=False,
        )
    assert not (tmp_path / "x" / "pytorch_lora_weights.safetensors").exists()
