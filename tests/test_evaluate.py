"""Adapter evaluation on the tiny models: metrics behave as documented, the report is complete, errors are clear."""

import json

import pytest
from PIL import Image

from common.errors import UserError
from evaluation import metrics as M
from evaluation.evaluate import Adapter, adapters_from_run, evaluate, recommend
from evaluation.report import recommendation_text
from evaluation.suites import load_suite
from flux2_lora import main
from helpers import HANG, train_args
from trainer.config import load_config
from trainer.recipe import run

SUITE = """name: mini
prompts:
  - {id: identity, kind: identity, text: "{trigger} logo on white"}
  - {id: colour, kind: colour, text: "{trigger} logo in #E4572E", colours: ["#E4572E"]}
  - {id: leak, kind: leakage, text: "a red circle"}
  - {id: edit, kind: edit, text: "put {trigger} on a mug", references: 1}
  - {id: sign, kind: text, text: '{trigger} sign reading "SALE"', expected_text: "SALE"}
"""


def _tiny_encoder(folder, kind):
    import torch
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
    )

    torch.manual_seed(0)
    if kind == "dinov2":
        Dinov2Model(
            Dinov2Config(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                image_size=32,
                patch_size=8,
            )
        ).save_pretrained(folder)
        BitImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ).save_pretrained(folder)
    else:
        CLIPModel(
            CLIPConfig(
                text_config=dict(
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    vocab_size=99,
                ),
                vision_config=dict(
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    image_size=32,
                    patch_size=8,
                ),
                projection_dim=8,
            )
        ).save_pretrained(folder)
        CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {k: _tiny_encoder(root / k, k) for k in ("dinov2", "clip")}


@pytest.fixture(scope="module")
def short_run(tiny_models, sample_data, shared_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = load_config(
        None,
        train_args(
            tiny_models["klein"],
            sample_data,
            out,
            shared_cache,
            train__steps=9,
            checkpoint__every=3,
            checkpoint__keep_last=5,
            optim__lr=3e-3,
        ),
    )
    run(cfg, show_progress=False)
    return out


def test_metrics_behave_as_documented(encoders):
    swatch = Image.new("RGB", (64, 64), "#E4572E")
    assert M.colour_delta_e(swatch, "#E4572E") < 0.5
    assert M.colour_delta_e(swatch, "#1B2A49") > 30
    noise = Image.effect_noise((64, 64), 80).convert("RGB")
    assert M.leakage(noise, noise) == 0.0 and M.leakage(swatch, noise) > 0.5
    assert M.diversity([noise, noise.copy()]) == 0.0 and M.diversity([noise]) is None
    for folder in encoders.values():
        enc = M.ImageEncoder(folder)
        refs = enc.embed([noise])
        assert enc.similarity([noise], refs) == pytest.approx(1.0, abs=1e-6)
        assert enc.similarity([swatch], refs) < 1.0


def test_text_accuracy_by_ocr():
    from PIL import ImageDraw, ImageFont

    pytest.importorskip("rapidocr_onnxruntime")  # installed by the test extra; optional for users
    sign = Image.new("RGB", (256, 128), "white")
    ImageDraw.Draw(sign).text((20, 30), "SALE", fill="black", font=ImageFont.load_default(size=60))
    assert M.text_error(sign, "SALE") == 0.0
    assert M.text_error(sign, "OPEN") >= 0.75
    assert M.text_error(Image.new("RGB", (256, 128), "white"), "SALE") == 1.0


@pytest.mark.slow
def test_evaluate_a_run_end_to_end(short_run, tiny_models, sample_data, encoders, tmp_path, capsys):
    adapters = adapters_from_run(short_run)
    assert [a.label for a in adapters] == ["step-3", "step-6", "final"] and adapters[-1].step == 9
    suite_file = tmp_path / "mini.yaml"
    suite_file.write_text(SUITE)
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--model",
            str(tiny_models["klein"]),
            "--run",
            str(short_run),
            "--suite",
            str(suite_file),
            "--scales",
            "0,0.5,1",
            "--seeds",
            "2",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--references",
            str(sample_data),
            "--encoder",
            str(encoders["dinov2"]),
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads((out / "metrics.json").read_text())
    columns = {c["column"]: c["metrics"] for c in result["columns"]}
    assert set(columns) == {"base"} | {
        f"{a} x{s}" for a in ("step-3", "step-6", "final") for s in ("0", "0.5", "1")
    }
    for label, m in columns.items():
        if label == "base" or label.endswith("x0"):
            assert m["leakage"] == 0.0  # scale 0 is the base: nothing leaks
        assert m["reference_similarity"] is not None and -1 <= m["reference_similarity"] <= 1
        assert m["colour_delta_e"] >= 0 and m["diversity"] is not None
    # the test extra installs the OCR; its reading of 64 px noise is simply wrong
    if M.ocr_available():
        assert all(0 <= m["text_error"] <= 1 for m in columns.values())
    rec = result["recommendation"]
    assert rec["scale"] > 0 and rec["adapter"] in {"step-3", "step-6", "final"}
    for name in (
        "report.html",
        "metrics.csv",
        "grid_seed0.png",
        "grid_seed1.png",
        "plots/leakage.png",
        "plots/reference_similarity.png",
    ):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "Recommended:" in html and '<img src="plots/leakage.png"' in html
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 10 * 5  # header + (base + 3 adapters x 3 scales) x 5 prompts


def test_same_inputs_give_identical_metrics(short_run, tiny_models, tmp_path):
    suite = load_suite("product")
    suite.prompts = suite.prompts[:3] + [p for p in suite.prompts if p.kind == "leakage"][:1]
    kw = dict(scales=(0, 1.0), seeds=1, steps=2, width=64, height=64, show_progress=False)
    adapters = [Adapter("final", short_run / "pytorch_lora_weights.safetensors")]
    a = evaluate(str(tiny_models["klein"]), adapters, suite, tmp_path / "a", **kw)
    b = evaluate(str(tiny_models["klein"]), adapters, suite, tmp_path / "b", **kw)
    assert a["columns"] == b["columns"] and a["recommendation"] == b["recommendation"]
    # no encoder: reported as unavailable, never faked
    assert "reference_similarity" in a["unavailable"]
    assert all(c["metrics"]["reference_similarity"] is None for c in a["columns"])


def test_recommendation_rule():
    def col(adapter, scale, sim, leak):
        return {
            "adapter": adapter,
            "step": None,
            "scale": scale,
            "column": f"{adapter} x{scale}",
            "metrics": {
                "reference_similarity": sim,
                "colour_delta_e": None,
                "leakage": leak,
                "diversity": None,
                "text_error": None,
            },
        }

    summary = [
        col("base", 0, 0.2, 0),
        col("a", 0.5, 0.6, 0.1),
        col("a", 1.0, 0.8, 0.1),
        col("b", 1.0, 0.9, 0.5),
    ]
    assert recommend(summary)["column"] == "a x1.0"  # 0.7 beats 0.5; b leaks 0.5 > 0.25
    # the most faithful column is never recommended when it leaks past the limit
    assert recommend(summary[:3] + [col("b", 1.0, 1.0, 0.26)])["column"] == "a x1.0"
    no_fidelity = [
        {**c, "metrics": {**c["metrics"], "reference_similarity": None}} for c in summary
    ]
    # the latest adapter with a column within the leakage limit, at its largest such scale
    assert recommend(no_fidelity)["column"] == "a x1.0"
    calm = no_fidelity + [col("b", 0.5, None, 0.1)]
    assert recommend(calm)["column"] == "b x0.5"
    leaky = [col("base", 0, 0.2, 0), col("a", 0.5, 0.9, 0.3), col("a", 1.0, 0.95, 0.54)]
    nothing = recommend(leaky)
    assert nothing["adapter"] is None and "least: a x0.5, 0.30" in nothing["why"]
    assert recommendation_text(nothing).startswith(
        "nothing recommended: every column changes prompts"
    )


@pytest.mark.parametrize(
    "case",
    [
        "no_checkpoints",
        "other_family",
        "suite_key",
        "encoder_missing",
        "encoder_not_image",
        "references_empty",
    ],
)
def test_bad_input_is_one_line(case, short_run, tiny_models, sample_data, tmp_path, capsys):
    argv = [
        "evaluate",
        "--model",
        str(tiny_models["klein"]),
        "--run",
        str(short_run),
        "--steps",
        "1",
        "--seeds",
        "1",
        "--width",
        "64",
        "--height",
        "64",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    ]
    expected = {
        "no_checkpoints": "holds no LoRA",
        "other_family": "trained on FLUX.2 klein, but the base model is dev",
        "suite_key": "config key 'prompts[0].colors' is unknown; did you mean 'prompts[0].colours'?",
        "encoder_missing": "is not a local model folder",
        "encoder_not_image": "is not an image model",
        "references_empty": "holds no readable images",
    }[case]
    if case == "no_checkpoints":
        (tmp_path / "empty_run").mkdir()
        argv[argv.index("--run") + 1] = str(tmp_path / "empty_run")
    elif case == "other_family":
        argv[argv.index("--model") + 1] = str(tiny_models["dev"])
    elif case == "suite_key":
        (tmp_path / "s.yaml").write_text(
            'name: x\nprompts:\n  - {id: a, kind: colour, text: "x", colors: ["#fff"]}\n'
        )
        argv += ["--suite", str(tmp_path / "s.yaml")]
    elif case == "encoder_missing":
        argv += ["--encoder", str(tmp_path / "nope")]
    elif case == "encoder_not_image":
        argv += ["--encoder", str(tiny_models["klein"] / "text_encoder")]
    else:
        (tmp_path / "empty").mkdir()
        argv += ["--references", str(tmp_path / "empty")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_example_script_evaluates_from_python(short_run, tiny_models, tmp_path):
    import subprocess
    import sys

    from helpers import REPO

    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "evaluate_checkpoints.py"),
            "--model",
            str(tiny_models["klein"]),
            "--run",
            str(short_run),
            "--suite",
            "style",
            "--out",
            str(tmp_path / "e"),
        ],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "recommended:" in proc.stdout and (tmp_path / "e" / "report.html").is_file()


def _retrigger(src, dst, trigger):
    """A copy of a LoRA file whose header names another trigger word."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, "pt") as fh:
        header, tensors = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}
    header["flux2_lora.trigger"] = trigger
    dst.parent.mkdir(parents=True)
    save_file(tensors, str(dst), metadata=header)
    return dst


def test_two_runs_are_compared_each_with_its_own_name_and_trigger(short_run, tiny_models, tmp_path):
    """Two runs' files share one file name: they get their run folders' names, and each its own trigger."""
    from evaluation.evaluate import adapters_from_files

    other = _retrigger(
        short_run / "pytorch_lora_weights.safetensors",
        tmp_path / "style-run" / "pytorch_lora_weights.safetensors",
        "qqv",
    )
    adapters = adapters_from_files(
        [short_run / "pytorch_lora_weights.safetensors", other, other.parent]
    )
    assert [a.label for a in adapters] == ["run", "style-run", "style-run-2"]
    suite = load_suite("product")
    suite.prompts = [p for p in suite.prompts if p.kind == "identity"][:1]
    result = evaluate(
        str(tiny_models["klein"]),
        adapters[:2],
        suite,
        tmp_path / "out",
        scales=(0, 1),
        seeds=1,
        steps=1,
        width=64,
        height=64,
        show_progress=False,
    )
    assert result["triggers"] == {"run": "zxq", "style-run": "qqv"}
    # each distinct prompt is encoded once, whatever the adapters and scales: 2 triggers + klein's empty negative
    # base x 2 triggers + 2 adapters at scale 1
    assert result["speed"]["text_encoder_calls"] == 3 and result["speed"]["renders"] == 4
    assert [c["column"] for c in result["columns"]] == [
        "base [zxq]",
        "base [qqv]",
        "run x0",
        "run x1",
        "style-run x0",
        "style-run x1",
    ]
    with pytest.raises(UserError, match="adapter names repeat"):
        evaluate(
            str(tiny_models["klein"]),
            [adapters[0], adapters[0]],
            suite,
            tmp_path / "o2",
            show_progress=False,
        )


def test_python_api_and_cli_check_options_alike(short_run, tiny_models, tmp_path, capsys):
    suite = load_suite("product")
    with pytest.raises(UserError, match="evaluate argument 'seeds' must be > 0, got 0"):
        evaluate(
            str(tiny_models["klein"]), adapters_from_run(short_run), suite, tmp_path / "o", seeds=0
        )
    with pytest.raises(
        UserError, match="evaluate argument 'width' must be a positive multiple of 16"
    ):
        evaluate(
            str(tiny_models["klein"]),
            adapters_from_run(short_run),
            suite,
            tmp_path / "o",
            width=100,
        )
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_models["klein"]),
                "--run",
                str(short_run),
                "--seeds",
                "0",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == "error: option '--seeds' must be > 0, got 0"


def test_evaluate_places_the_model_where_asked(short_run, tiny_models, tmp_path, capsys):
    argv = [
        "evaluate",
        "--model",
        str(tiny_models["klein"]),
        "--run",
        str(short_run),
        "--scales",
        "0,1",
        "--seeds",
        "1",
        "--steps",
        "1",
        "--width",
        "64",
        "--height",
        "64",
        "--suite",
        "style",
        "--no-progress",
    ]
    assert (
        main([*argv, "--device", "cpu", "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")])
        == 0
    )
    assert json.loads((tmp_path / "bf16" / "metrics.json").read_text())["speed"]["renders"] > 0
    assert main([*argv, "--device", "cuda:7", "--out", str(tmp_path / "x")]) == 2
    assert "device 'cuda:7' is not available on this machine" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
