"""The config tree: strict keys with hints, types, checks, overrides, and every shipped preset."""

import pytest

from common.errors import UserError
from helpers import REPO
from trainer.config import dump_config, load_config

BASE = ["model.path=m", "data.path=d"]


def _error(overrides, path=None) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, BASE + overrides)
    return str(info.value)


def test_overrides_reach_the_typed_tree():
    cfg = load_config(
        None,
        BASE
        + [
            "optim.lr=5e-5",
            "train.steps=200",
            "lora.rank=32",
            "resume=latest",
            "data.trigger=sks",
            "train.mixed_precision=bf16",
        ],
    )
    assert cfg.optim.lr == 5e-5 and isinstance(cfg.optim.lr, float)
    assert (cfg.train.steps, cfg.lora.rank, cfg.resume, cfg.data.trigger) == (
        200,
        32,
        "latest",
        "sks",
    )
    assert "lr: 5.0e-05" in dump_config(cfg)


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\ndata: {path: d}\noptim:\n  lr: 5e-5\n")
    assert load_config(f).optim.lr == 5e-5


@pytest.mark.parametrize(
    "override, expected",
    [
        (["optim.lrr=1"], "config key 'optim.lrr' is unknown; did you mean 'optim.lr'?"),
        (["trian.steps=1"], "config key 'trian' is unknown; did you mean 'train'?"),
        (["train.steps=many"], "config key 'train.steps' must be int, got 'many'"),
        (["optim.lr=0"], "config key 'optim.lr' must be > 0, got 0.0"),
        (["optim.lr=-1e-4"], "config key 'optim.lr' must be > 0"),
        (["lora.rank=0"], "config key 'lora.rank' must be > 0, got 0"),
        (
            ["train.resolution=1000"],
            "config key 'train.resolution' must be a positive multiple of 16, got 1000 (try 992)",
        ),
        (["train.mixed_precision=bf61"], "did you mean 'bf16'?"),
        (["model.family=flux"], "config key 'model.family' must be one of 'auto', 'dev', 'klein'"),
        (["train.caption_dropout=1.5"], "must be between 0 and 1"),
        (["train=3"], "config key 'train' must be a mapping"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(override, expected):
    assert expected in _error(override)


def test_missing_paths_are_reported():
    with pytest.raises(UserError, match="model.path is empty"):
        load_config(None, ["data.path=d"])
    with pytest.raises(UserError, match="data.path is empty"):
        load_config(None, ["model.path=m"])


def test_bad_yaml_files(tmp_path):
    assert "does not exist" in _error([], tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [1,\n")
    assert "is not valid YAML at line" in _error([], broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert "mapping of keys at the top level" in _error([], listy)
    assert "must look like key.path=value" in _error(["optim.lr"])


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(preset):
    header = "".join(
        line
        for line in (REPO / "configs" / preset).read_text().splitlines(True)
        if line.startswith("#")
    )
    assert (
        "launch" in header.lower()
        and "target" in header.lower()
        and "train.py --config configs/" in header
    )
    load_config(REPO / "configs" / preset)  # raises UserError on any bad key or value


def test_config_reference_doc_is_current():
    from trainer.config import config_reference

    assert (REPO / "docs" / "config.md").read_text() == config_reference() + "\n", (
        "run: flux2-lora config-reference > docs/config.md"
    )


def test_show_config_prints_the_resolved_tree(capsys):
    from flux2_lora import main

    assert (
        main(
            [
                "show-config",
                "--config",
                str(REPO / "configs" / "quickstart.yaml"),
                "train.steps=250",
            ]
        )
        == 0
    )
    assert "steps: 250" in capsys.readouterr().out


def test_cross_section_problems_are_reported_together():
    message = _error(
        [
            "regularization.preserve=true",
            "regularization.class_prompt=a logo",
            "validation.every=5",
            "model.family=klein",
            "train.guidance=3.5",
        ]
    )
    assert message.startswith(
        "3 problems: (1) train.guidance is set, but FLUX.2 klein has no guidance"
    )
    assert "(2) regularization.preserve replaces the trigger word in captions" in message
    assert "(3) validation.every is set but nothing is held out" in message and "\n" not in message


def test_a_short_run_of_a_preset_runs_with_one_warning(capsys):
    preset = REPO / "configs" / "klein-4b-character.yaml"
    cfg = load_config(preset, ["train.steps=10"])
    warning = capsys.readouterr().err.strip()
    assert warning == (
        "warning: train.steps=10 is a short run: optim.warmup_steps 50 -> 1; validation.every 250 and "
        "checkpoint.every 250 beyond the run -> 0 (at the end / on signals only)"
    )
    assert (cfg.optim.warmup_steps, cfg.validation.every, cfg.checkpoint.every) == (1, 0, 0)
    assert "warmup_steps: 1" in dump_config(cfg)  # what output.dir/config.yaml records
    load_config(preset, ["train.steps=2000"])
    assert capsys.readouterr().err == ""  # a full run is left as it is


def test_a_hex_colour_that_yaml_would_cut_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        'sample:\n  prompts:\n    - "zxq mug, #E4572E quoted"\n    - zxq mug, a #E4572E ring\n'
    )
    assert _error([], cfg) == (
        f"config file '{cfg}' line 4: #E4572E starts a YAML comment there, so the rest of the "
        "line is dropped; put the value in quotes"
    )
