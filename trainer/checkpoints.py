"""Checkpoints: accelerate state + LoRA weights under output.dir/checkpoints/step-N, written atomically.

Every rank calls `save`, because accelerate writes one RNG file per process; rank 0 alone renames the
finished temporary folder into place, so a checkpoint folder is either complete or absent.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from data_tools.atomic import fsync_dir, fsync_tree
from data_tools.configtree import non_negative, option, positive
from data_tools.errors import UserError

STATE_FILE = "trainer_state.json"


@dataclasses.dataclass
class CheckpointConfig:
    every: int = option(0, check=non_negative, help="save every N steps; 0 saves only on signals")
    keep_last: int = option(3, check=positive, help="older checkpoints are deleted")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(f"resume: latest, but '{checkpoint_root(output_dir)}' holds no checkpoint; "
                            "remove resume to start fresh")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume: '{resume}' is not a checkpoint folder (no {STATE_FILE}); use latest or a step-N folder")
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def save(accelerator, output_dir: Path, step: int, keep_last: int) -> Path:
    root = checkpoint_root(output_dir)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
