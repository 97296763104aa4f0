"""Every adapter kind x every file flux2-lora writes x every tool that reads FLUX.2 LoRAs: what each tool applies,
measured against the merged weights peft computes. Stock diffusers and our own loader run for real; ComfyUI,
musubi-tuner and ai-toolkit are replayed from their loaders' rules (tests/peers.py). The README's interop table is
this test's output: `python tests/test_interop.py` rewrites it, and the test fails when it is stale."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import peers

from helpers import REPO

KINDS = ("lora", "dora", "lokr", "loha")
FILES = ("ours", "comfyui", "kohya", "bfl")
TOOLS = ("diffusers", "flux2-lora", "ComfyUI", "musubi-tuner", "ai-toolkit")
BEGIN, END = "<!-- interop table: tests/test_interop.py -->", "<!-- end of interop table -->"


def _trained(model: Path, kind: str, targets: str, rank=4, alpha=6.0):
    """The model's transformer with a LoRA of `kind` on `targets`, all of its tensors random (a fresh one is
    zero where a mapping mistake would hide); DoRA magnitudes near the merged rows' norms, as trained ones are."""
    from diffusers import Flux2Transformer2DModel

    from trainer.lora import LoraSettings, add_lora

    transformer = Flux2Transformer2DModel.from_pretrained(model / "transformer")
    add_lora(transformer, LoraSettings(type=kind, rank=rank, alpha=alpha, targets=targets), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.requires_grad and "magnitude" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if kind == "dora":
            for m in transformer.modules():
                if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector:
                    merged = m.get_base_layer().weight + m.get_delta_weight("default")
                    mag = m.lora_magnitude_vector["default"].weight
                    mag.copy_(merged.norm(dim=1) * (1 + 0.2 * torch.randn(mag.shape, generator=g)))
    return transformer


def _merged(transformer, adapter: str) -> torch.nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(transformer)
    for m in merged.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge(adapter_names=[adapter])
    return merged


def _verdict(patched: dict, intended: dict, base: dict) -> str:
    changed = [k for k in intended if not torch.allclose(intended[k], base[k])]
    right = [k for k in changed if torch.allclose(patched[k], intended[k], atol=1e-4, rtol=1e-3)]
    untouched_ok = all(torch.allclose(patched[k], base[k]) for k in intended if k not in changed)
    if len(right) == len(changed) and untouched_ok:
        return "exact"
    return "partial" if right else "no"


def _measure(family: str, kind: str, tmp: Path, targets: str = "attention_mlp") -> dict:
    from inference.adapters import load_adapter
    from inference.export import export_lora
    from inference.families import FAMILIES
    from inference.lora_io import save_lora
    from inference.tiny import write_tiny_model

    model = tmp / f"model-{family}"
    if not model.exists():
        write_tiny_model(model, FAMILIES[family], pretrained=False)
    trained = _trained(model, kind, targets)
    tmp = tmp / f"{family}-{kind}-{targets}"
    tmp.mkdir()
    ours = tmp / f"{family}-{kind}.safetensors"
    save_lora(
        ours, trained, FAMILIES[family], {"family": family, "type": kind, "base_model": str(model)}
    )
    base, where = peers.bfl_model(_merged(trained, "none"))
    intended, _ = peers.bfl_model(_merged(trained, "default"))
    files = {"ours": ours}
    for fmt in FILES[1:]:
        try:
            export_lora(ours, fmt, tmp / f"{family}-{kind}-{fmt}.safetensors")
            files[fmt] = tmp / f"{family}-{kind}-{fmt}.safetensors"
        except Exception:  # a layout the tool cannot carry: refused by export in one line
            files[fmt] = None
    verdicts = {}
    for fmt, path in files.items():
        if path is None:
            verdicts.update({(fmt, tool): "refused by export" for tool in TOOLS})
            continue
        state = load_file(path)
        for tool, load in (("diffusers", "stock"), ("flux2-lora", "ours")):
            pipe = FAMILIES[family].pipeline_class.from_pretrained(
                model, text_encoder=None, tokenizer=None, vae=None
            )
            try:
                if load == "stock":
                    pipe.load_lora_weights(
                        str(path.parent), weight_name=path.name, adapter_name="x"
                    )
                else:
                    load_adapter(pipe, family, path, "x")
                got, _ = peers.bfl_model(_merged(pipe.transformer, "x"))
                verdicts[(fmt, tool)] = _verdict(got, intended, base)
            except Exception:
                verdicts[(fmt, tool)] = "refuses"
        verdicts[(fmt, "ComfyUI")] = _verdict(peers.comfyui(base, where, state)[0], intended, base)
        verdicts[(fmt, "musubi-tuner")] = _verdict(peers.musubi(base, state)[0], intended, base)
        largest = max(
            (t.shape[0] for k, t in state.items() if k.endswith("lora_A.weight")), default=1
        )
        advised = _verdict(
            peers.ai_toolkit(base, state, largest, largest, transformer_only=False)[0],
            intended,
            base,
        )
        default = _verdict(peers.ai_toolkit(base, state, 4, 4)[0], intended, base)
        verdicts[(fmt, "ai-toolkit")] = (
            advised if advised == default else f"{advised}; {default} with defaults"
        )
    return verdicts


def interop_table(tmp: Path) -> str:
    rows = ["| adapter | file | " + " | ".join(TOOLS) + " |", "|" + "---|" * (len(TOOLS) + 2)]
    names = {
        "ours": "`pytorch_lora_weights.safetensors`",
        "comfyui": "`--format comfyui`",
        "kohya": "`--format kohya`",
        "bfl": "`--format bfl`",
    }
    for kind in KINDS:
        # the presets' targets, and every Linear layer (modulation, embedders, final layer): where tools differ
        runs = {
            (f, t): _measure(f, kind, tmp, t)
            for f in ("klein", "dev")
            for t in ("attention_mlp", "all_linear")
        }
        for fmt in FILES:
            rows.append(
                f"| {kind} | {names[fmt]} | "
                + " | ".join(_cell(runs, fmt, t) for t in TOOLS)
                + " |"
            )
    return "\n".join(rows)


def _cell(runs: dict, fmt: str, tool: str) -> str:
    seen = {key: v[(fmt, tool)] for key, v in runs.items()}
    if len(set(seen.values())) == 1:
        return next(iter(seen.values()))
    by_targets = {
        t: {v for (_, tt), v in seen.items() if tt == t} for t in ("attention_mlp", "all_linear")
    }
    if all(len(v) == 1 for v in by_targets.values()):  # the families agree
        return f"{next(iter(by_targets['attention_mlp']))}; all_linear: {next(iter(by_targets['all_linear']))}"
    return "; ".join(f"{f} {t}: {v}" for (f, t), v in seen.items())


def _readme_table() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(re.escape(BEGIN) + r"\n(?:(.*?)\n)?" + re.escape(END), text, re.S)
    assert found, f"README.md has no {BEGIN} ... {END} block"
    return found.group(1) or ""


@pytest.mark.slow
def test_the_readme_interop_table_is_what_the_tools_do(tmp_path):
    assert interop_table(tmp_path) == _readme_table(), "stale: run python tests/test_interop.py"


def test_the_promises_the_table_makes(tmp_path):
    """The cells users rely on, for the presets' targets on klein (the fast part of the table)."""
    lora, dora = _measure("klein", "lora", tmp_path), _measure("klein", "dora", tmp_path)
    # plain LoRA in the ComfyUI layout: exact everywhere (stock diffusers too: no .alpha key left to refuse)
    assert [lora[("comfyui", t)] for t in TOOLS[:4]] == ["exact"] * 4
    # cut to its network rank
    assert lora[("comfyui", "ai-toolkit")] == "exact; partial with defaults"
    assert dora[("comfyui", "ComfyUI")] == "exact" and dora[("comfyui", "flux2-lora")] == "exact"
    assert dora[("ours", "ComfyUI")] == "no"  # it drops peft's magnitudes: what the export is for
    assert dora[("kohya", "musubi-tuner")] == "refused by export"
    lokr = _measure("klein", "lokr", tmp_path)
    assert lokr[("kohya", "musubi-tuner")] == "exact" and lokr[("comfyui", "flux2-lora")] == "exact"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        table = interop_table(Path(tmp))
    readme = REPO / "README.md"
    text = readme.read_text()
    new = re.sub(
        # an empty block is one line break between the markers
        re.escape(BEGIN) + r"\n(?:.*?\n)?" + re.escape(END),
        lambda m: f"{BEGIN}\n{table}\n{END}",
        text,
        flags=re.S,
    )
    readme.write_text(new)
    print(table)
