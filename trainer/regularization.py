"""Keeping the trigger from bleeding into everything else: prior-preservation images and differential output
preservation (DOP).

- `regularization.images`: a folder of class images with their own captions (no trigger), trained alongside the
  subject at `regularization.weight`: the LoRA keeps drawing ordinary members of the class.
- `regularization.preserve`: each step also shows the LoRA its caption with the trigger replaced by
  `regularization.class_prompt`, and pulls its prediction there toward the base model's (adapter off, no
  gradient): what the LoRA changes is tied to the trigger word.
"""

from __future__ import annotations

import dataclasses

from common.configtree import non_negative, option
from common.trigger import replace_trigger


@dataclasses.dataclass
class RegularizationConfig:
    images: str | None = option(
        None,
        help="folder of class images with captions (prior preservation), e.g. 20-50 "
        "photos of other logos for a logo LoRA",
    )
    weight: float = option(
        1.0,
        check=non_negative,
        help="loss weight of a regularization image against a subject image",
    )
    preserve: bool = option(
        False,
        help="differential output preservation: with the trigger replaced by class_prompt, "
        "the LoRA's prediction is pulled toward the base model's (two extra forward "
        "passes a step)",
    )
    class_prompt: str | None = option(
        None, help="what replaces the trigger for preservation, e.g. 'a logo'"
    )
    preserve_weight: float = option(1.0, check=non_negative, help="weight of the preservation loss")

    def validate(self) -> list[str]:
        if self.preserve and not (self.class_prompt or "").strip():
            return [
                "regularization.preserve needs regularization.class_prompt (what the trigger stands for, "
                "e.g. 'a logo')"
            ]
        return []


def preservation_captions(captions: list[str], trigger: str, class_prompt: str) -> dict[str, str]:
    """Each caption -> the same caption with the trigger replaced by the class prompt."""
    return {c: replace_trigger(c, trigger, class_prompt) for c in set(captions)}
