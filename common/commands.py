"""What every subcommand is made of, and what every command does before its work starts."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its flags (beside the code they drive) and what it runs. Its one-line help is in the hub."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is nothing useful to show (flags off, no value)."""

    def _get_help_string(self, action):
        nothing = (
            action.default is None
            or action.default is False
            or action.default == []
            or action.default == argparse.SUPPRESS
        )
        if nothing or action.required or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def silence_known_noise() -> None:
    """Warnings a user can do nothing about, printed on every command by the libraries' imports: torch 2.14 warns
    once per Enum that torchao registers with pytree (`register_constant() ... deprecated`). Run first thing."""
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """Our own progress bars and one-line messages, not the libraries' chatter. Imported per command, because
    importing diffusers costs seconds a command like `sample-data` does not need."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # datasets reads this when (and if) a command imports it: importing it here would cost ~0.6 s for nothing
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    # one summary from a multi-process run: rank 0 says everything, the others only warnings, marked with their rank
    if rank() == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format=f"[rank {rank()}] %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    # huggingface_hub has its own handler; propagating to ours too printed every hub retry twice
    logging.getLogger("huggingface_hub").propagate = False


def rank() -> int:
    """This process's rank in a multi-process launch (0 when there is none)."""
    return int(os.environ.get("RANK", "0"))
