"""Loading a transformers model and its processor from a local folder, with one-line errors."""

from __future__ import annotations

from pathlib import Path

from common.errors import UserError


def load_local(
    model_dir: Path, processor_dir: Path, model_cls, processor_cls, flag: str, what: str
):
    """-> (processor, model in eval mode). `flag` names the option in errors, `what` the kind of model expected."""
    if not model_dir.is_dir():
        raise UserError(f"{flag} '{model_dir}' is not a local model folder; pass {what} folder")
    try:
        processor = processor_cls.from_pretrained(str(processor_dir))
        model = model_cls.from_pretrained(str(model_dir)).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"{flag} '{model_dir}' is not {what} transformers can load "
            f"({str(exc).splitlines()[0][:120]})"
        ) from None
    return processor, model
