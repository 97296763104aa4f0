"""Several processes and machines fill the cache together: each process of a machine encodes its share (split by
hash), the machine's cache ends complete and identical to a one-process fill, and training then equals one
process with the matching gradient accumulation. Real gloo process groups on the CPU, as a GPU cluster runs them
with NCCL."""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import HANG, REPO, train_args
from trainer.config import load_config
from trainer.recipe import _accelerator

STEPS = dict(train__steps=4, train__batch_size=2, train__caption_dropout=0.2)


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(
    cwd: Path,
    args: list[str],
    *,
    nodes: int = 1,
    node_rank: int = 0,
    procs: int = 2,
    port: int | None = None,
) -> subprocess.Popen:
    (cwd / "empty.yaml").write_text("{}\n")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nodes),
        "--node_rank",
        str(node_rank),
        "--nproc_per_node",
        str(procs),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port or _port()),
        str(REPO / "train.py"),
        "--config",
        str(cwd / "empty.yaml"),
        "--no-progress",
        *args,
    ]
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, out[-4000:]
    return out


def _files(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def one_process(tiny_models, sample_data, tmp_path_factory) -> tuple[dict, Path, tuple[int, int]]:
    """The reference both multi-process runs are held to: one process, under the same launcher and thread count (a
    different thread count changes float rounding in the encoders), with their gradient accumulation (2)."""
    tmp = tmp_path_factory.mktemp("one-process")
    cache = tmp / "cache-one"
    args = train_args(
        tiny_models["klein"],
        sample_data,
        tmp / "one",
        cache,
        **STEPS,
        train__gradient_accumulation=2,
    )
    said = _finish(_torchrun(tmp, args, procs=1))
    calls = re.search(r"text encoder ran (\d+) times, VAE (\d+) times", said).groups()
    return (
        load_file(tmp / "one" / "pytorch_lora_weights.safetensors"),
        cache,
        tuple(map(int, calls)),
    )


@pytest.mark.slow
def test_two_processes_split_the_cache_fill_and_train_what_one_does(
    tiny_models, sample_data, one_process, tmp_path
):
    model = tiny_models["klein"]
    cache = tmp_path / "cache-two"
    said = _finish(
        _torchrun(tmp_path, train_args(model, sample_data, tmp_path / "two", cache, **STEPS))
    )
    found = re.search(
        r"cache filled by 2 processes: text encoder (\d+) \+ (\d+) calls, VAE (\d+) \+ (\d+)", said
    )
    text_0, text_1, vae_0, vae_1 = map(int, found.groups())
    alone, one_cache, (text_calls, vae_calls) = one_process
    # each rank encoded a part, and together exactly what one process encodes
    assert min(text_0, text_1, vae_0, vae_1) > 0, said[-2000:]
    assert (text_0 + text_1, vae_0 + vae_1) == (text_calls, vae_calls)
    assert _files(cache) == _files(one_cache)  # complete, and byte for byte a one-process fill
    two = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert two.keys() == alone.keys()
    for key, value in two.items():
        torch.testing.assert_close(value, alone[key], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_two_machines_each_fill_their_own_cache_and_train_what_one_process_does(
    tiny_models, sample_data, one_process, tmp_path
):
    """The README's two-machine line on one box: two torchrun groups (--nnodes 2, node ranks 0 and 1), one
    process each, no shared cache folder."""
    model, port = tiny_models["klein"], _port()
    out = tmp_path / "nodes"
    nodes = [
        _torchrun(
            tmp_path,
            train_args(model, sample_data, out, tmp_path / f"cache-node{rank}", **STEPS),
            nodes=2,
            node_rank=rank,
            procs=1,
            port=port,
        )
        for rank in (0, 1)
    ]
    said = [_finish(p) for p in nodes]
    assert "all 2 ranks hold identical LoRA weights" in said[0]
    # each machine filled its own
    assert _files(tmp_path / "cache-node0") == _files(tmp_path / "cache-node1")
    alone, one_cache, _ = one_process
    assert _files(tmp_path / "cache-node0") == _files(one_cache)
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    for key, value in lora.items():
        torch.testing.assert_close(value, alone[key], atol=1e-5, rtol=1e-4)


def test_the_process_group_timeout_reaches_the_accelerator(tiny_models, sample_data, tmp_path):
    cfg = load_config(
        None,
        train_args(
            tiny_models["klein"],
            sample_data,
            tmp_path / "r",
            tmp_path / "c",
            train__process_timeout=90,
        ),
    )
    assert _accelerator(cfg, tmp_path / "r").init_handler.timeout.total_seconds() == 90 * 60


@pytest.mark.slow
def test_machines_with_different_data_are_refused_before_training(
    tiny_models, sample_data, tmp_path
):
    other = shutil.copytree(sample_data, tmp_path / "other-copy")
    first = sorted(other.glob("*.png"))[0]
    Image.new("RGB", Image.open(first).size, "purple").save(first)  # one image differs on machine 1
    port, out = _port(), tmp_path / "nodes"
    nodes = [
        _torchrun(
            tmp_path,
            train_args(tiny_models["klein"], data, out, tmp_path / f"cache{rank}", **STEPS),
            nodes=2,
            node_rank=rank,
            procs=1,
            port=port,
        )
        for rank, data in ((0, sample_data), (1, other))
    ]
    said = [p.communicate(timeout=HANG)[0] for p in nodes]
    assert all(p.returncode != 0 for p in nodes)
    assert "error: data.path holds different images on rank(s) 1 than on rank 0" in said[0], said[
        0
    ][-2000:]
    assert not (out / "pytorch_lora_weights.safetensors").exists()
