"""The adapter-kind registry: each entry's declarations are what peft really builds and saves."""

import pytest
from diffusers import Flux2Transformer2DModel
from peft import get_peft_model_state_dict

from inference.adapter_kinds import KINDS, factor_names, kind_of, module_of, quantize_problem
from trainer.lora import LoraSettings, add_lora, targeted_layers, trainable_parameters
from trainer.memory import transformer_shape


@pytest.mark.parametrize("name", list(KINDS))
def test_each_kind_trains_saves_and_is_planned_as_declared(name, tiny_models):
    transformer = Flux2Transformer2DModel.from_pretrained(tiny_models["klein"] / "transformer")
    # the planner's count of trainable parameters (before injection) is the kind's declaration
    planned = transformer_shape(transformer, 2, 4, name, "attention_mlp").lora_params
    targets = set(targeted_layers(transformer, "attention_mlp"))
    add_lora(transformer, LoraSettings(type=name, rank=4, alpha=4.0), seed=0)
    kind = KINDS[name]
    built = sum(p.numel() for p in trainable_parameters(transformer))
    assert planned == built, (name, planned, built)
    saved = get_peft_model_state_dict(transformer)
    wrapped = {module_of(k) for k in saved} - {None}
    assert wrapped == targets, name
    factors = {k.removesuffix(".weight").rpartition(".")[2] for k in saved if module_of(k)}
    assert factors <= set(kind.factors) and factors, (name, factors)
    # what is left over is DoRA's magnitudes, and only where the kind declares them
    assert any("magnitude" in k for k in saved) == kind.magnitudes


def test_the_rules_ask_the_entry():
    assert kind_of("something-else") is KINDS["lora"]  # other tools' files are plain LoRA
    assert quantize_problem(KINDS["lokr"], "int8") and not quantize_problem(KINDS["dora"], "int8")
    assert KINDS["dora"].export_problem("kohya") and not KINDS["dora"].export_problem("comfyui")
    assert "--model" in KINDS["dora"].export_problem("comfyui", has_base=False)
    assert not KINDS["lora"].export_problem("bfl", has_base=False)
    assert {"lora_down", "lokr_w1", "hada_w2_b"} <= set(factor_names())
    assert module_of("diffusion_model.x.alpha") is None
    assert LoraSettings(type="loha", dropout=0.1).validate()
    assert not LoraSettings(type="dora", dropout=0.1).validate()


def test_the_trainer_names_no_kind():
    """Adding a kind touches the registry: the code outside it never compares lora.type (or a file's kind) with
    a kind's name."""
    from helpers import REPO

    pattern = __import__("re").compile(r"""(==|!=|\bin)\s*\(?\s*["'](lora|dora|lokr|loha)["']""")
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in [*REPO.glob("trainer/*.py"), *REPO.glob("inference/*.py")]
        if path.name != "adapter_kinds.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and ("type" in line or "kind" in line)
    ]
    assert not offenders, offenders
