"""The run folder a training run writes, and the one reader that generate, evaluate and the scripts use.

RUN/pytorch_lora_weights.safetensors    the final LoRA (its header's flux2_lora.step says at which step)
RUN/pytorch_lora_weights_ema.safetensors  its exponential moving average (with ema.decay)
RUN/config.yaml, RUN/README.md          the resolved config, the model card
RUN/checkpoints/step-N/                 accelerate state, the LoRA at step N, trainer_state.json
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from common.errors import UserError
from inference.lora_io import WEIGHT_NAME, our_info, read_header

# with ema.decay: the moving average of the weights
EMA_WEIGHT_NAME = "pytorch_lora_weights_ema.safetensors"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete
CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
RUN_MARKERS = (CONFIG_FILE, WEIGHT_NAME, CHECKPOINTS)  # a folder holding any of these holds a run


def checkpoint_dir(run: str | Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step}"


def _folder_step(folder: Path) -> int | None:
    return (
        int(folder.name[5:])
        if folder.name.startswith("step-") and folder.name[5:].isdigit()
        else None
    )


def list_checkpoints(run: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if _folder_step(p) is not None and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=_folder_step)


def lora_step(path: Path) -> int | None:
    """The training step a LoRA file was saved at, from its header (older files said `steps`)."""
    info = our_info(read_header(path))
    step = info.get("step", info.get("steps"))
    return int(step) if isinstance(step, (int, float, str)) and str(step).isdigit() else None


@dataclasses.dataclass(frozen=True)
class RunLora:
    label: str  # "step-200", or "final"
    path: Path
    step: int | None


def run_loras(run: str | Path) -> list[RunLora]:
    """Every checkpoint's LoRA, then the final one (unless a checkpoint holds the same step), in step order."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run '{run}' is not a folder; pass a training output.dir")
    found = [
        RunLora(ckpt.name, ckpt / WEIGHT_NAME, lora_step(ckpt / WEIGHT_NAME) or _folder_step(ckpt))
        for ckpt in list_checkpoints(run)
        if (ckpt / WEIGHT_NAME).is_file()
    ]
    final = run / WEIGHT_NAME
    if final.is_file():
        step = lora_step(final)
        if step is None or step not in {f.step for f in found}:
            found.append(RunLora("final", final, step))
    if not found:
        raise UserError(
            f"run '{run}' holds no LoRA (neither {WEIGHT_NAME} nor {CHECKPOINTS}/step-N/{WEIGHT_NAME})"
        )
    return found


def lora_file(path: str | Path) -> Path:
    """A LoRA file as given, or a run folder's final LoRA."""
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHT_NAME).is_file():
            raise UserError(
                f"LoRA folder '{path}' holds no {WEIGHT_NAME}; pass the .safetensors file itself"
            )
        return path / WEIGHT_NAME
    return path


def lora_label(path: str | Path) -> str:
    """A readable name for a LoRA file: the run folder's name for `RUN/pytorch_lora_weights.safetensors`,
    `RUN/step-N` for a checkpoint's, else the file's stem."""
    path = lora_file(path)
    if path.name != WEIGHT_NAME:
        return path.stem
    folder = path.parent
    if _folder_step(folder) is not None and folder.parent.name == CHECKPOINTS:
        return f"{folder.parent.parent.resolve().name}/{folder.name}"
    return folder.resolve().name
