"""An exponential moving average of the LoRA weights: smoother than the last step's, often the better file."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from common.configtree import option


def _decay_problem(value: float) -> str | None:
    return (
        None
        if 0.0 <= value < 1.0
        else f"must be in [0, 1) (0 turns EMA off; 0.99-0.999 is usual), got {value}"
    )


@dataclasses.dataclass
class EmaConfig:
    decay: float = option(
        0.0,
        check=_decay_problem,
        help="EMA of the LoRA weights (0 = off; e.g. 0.999): saved as "
        "pytorch_lora_weights_ema.safetensors and used for samples",
    )


class LoraEMA:
    """Shadow copies (float32) of the trainable parameters. Checkpointed through accelerate (state_dict)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, p in zip(self.shadow, self.params):
            shadow.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for the duration (samples, saving), the trained ones back afterwards."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, shadow in zip(self.params, self.shadow):
                p.copy_(shadow.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, kept in zip(self.params, saved):
                    p.copy_(kept)

    def state_dict(self) -> dict:
        return {"shadow": [s.cpu() for s in self.shadow], "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = [s.to(p.device) for s, p in zip(state["shadow"], self.params)]
