"""`flux2-lora rehearse`: a preset's code path at klein-4B's real width, measured against the planner."""

import json

import pytest

from flux2_lora import main
from helpers import REPO
from trainer.phases import LOAD, SAMPLES, STEP, TEXT_ENCODER, VAE
from trainer.rehearse import TOLERANCE, Measured, _report


@pytest.mark.slow
def test_klein_4b_at_real_width_stays_within_its_plan(tmp_path, capsys):
    """One double and one single block at klein-4B's width (3072, text 7680; Qwen3-4B cut to 3 layers with its
    151,936-token embedding), the DoRA + preservation + EMA preset at 256 px: every phase within 10 % of its
    plan, the text encoder gone before the transformer loads, and every LoRA file reloading whole."""
    report_file = tmp_path / "r.json"
    code = main(
        [
            "rehearse",
            "--config",
            str(REPO / "configs" / "klein-4b-character.yaml"),
            "train.resolution=256",
            # one micro-batch a step, four drawn images: the same peaks as the preset's two and twelve, in half
            # the time (each phase's peak is one micro-batch's, one caption's, one image's)
            "train.gradient_accumulation=1",
            # the end-of-run validation loss at one sigma, not four: it is not a planned phase
            "validation.sigmas=[0.5]",
            "--images",
            "4",
            "--layers",
            "1,1",
            "--steps",
            "1",
            "--model-dir",
            str(tmp_path / "model"),
            "--json",
            str(report_file),
            "--no-progress",
        ]
    )
    report = json.loads(report_file.read_text())
    phases = {p["name"]: p for p in report["phases"]}
    assert code == 0, capsys.readouterr().out[-3000:]
    assert {TEXT_ENCODER, VAE, LOAD, STEP, SAMPLES} <= phases.keys()
    for name in (TEXT_ENCODER, VAE, LOAD, STEP, SAMPLES):
        assert phases[name]["measured_gib"] <= TOLERANCE * phases[name]["planned_gib"], phases[name]
        assert phases[name]["measured_gib"] > 0
    # the text encoder (1.3 GiB here) was freed: loading holds the transformer (1.05 GiB) and little else
    assert phases[LOAD]["measured_gib"] < phases[TEXT_ENCODER]["measured_gib"] + 0.5
    files = {lo["path"]: lo for lo in report["loras"]}
    assert {
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_comfyui.safetensors",
    } <= files.keys()
    assert all(lo["every_module"] for lo in files.values())
    assert (
        files["pytorch_lora_weights.safetensors"]["applied"]["diffusers"]
        == files["pytorch_lora_weights.safetensors"]["modules"]
    )


def test_a_phase_over_its_plan_is_named():
    from trainer.memory import Phase, Plan
    from trainer.rehearse import MemoryWatcher

    gib = 2**30
    plan = Plan(
        "m",
        [Phase(STEP, 0.0, 3.0 * gib, {})],
        None,
        None,
        1,
        [],
        process_ram=1.0 * gib,
        device="cpu",
    )
    watcher = MemoryWatcher(cuda=False)
    watcher.seen = {STEP: Measured(seconds=1.0, tensors=int(2.3 * gib), rss=0, times=1)}
    over = _report(plan, watcher, [])["phases"][0]
    assert (
        over["planned_gib"] == 2.0 and over["over_plan"]
    )  # 2.3 GiB > 1.1 x 2.0 (the process's own excluded)
    watcher.seen[STEP].tensors = int(2.1 * gib)
    assert not _report(plan, watcher, [])["phases"][0]["over_plan"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--config", "configs/quickstart.yaml"],
            "rehearse builds the model from its shipped architecture",
        ),
        (
            ["--config", "configs/klein-4b-style.yaml", "--layers", "two"],
            "--layers 'two' must be DOUBLE,SINGLE",
        ),
        (["--config", "configs/klein-4b-style.yaml", "--layers", "0,0"], "keep at least one block"),
        (["--config", "configs/klein-4b-style.yaml", "--steps", "0"], "--steps must be at least 1"),
        (
            ["--config", "configs/klein-4b-style.yaml", "--images", "1"],
            "--images must be at least 2",
        ),
        (["--config", "configs/klein-4b-style.yaml", "lora.rnak=4"], "did you mean"),
    ],
)
def test_rehearse_refuses_bad_input_in_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["rehearse", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err
