"""Find, check and load a FLUX.2 base model (a local diffusers folder or a hub id)."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch

from common.configtree import option
from common.errors import UserError
from inference.families import (
    FAMILIES,
    Family,
    FamilyChoice,
    family_for_pipeline_class,
    shipped_config,
)
from inference.quantize import (
    QUANTIZE_HELP,
    Quantize,
    diffusers_config,
    transformers_config,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class ModelConfig:
    path: str = option("", help="local diffusers folder or hub id of the base model")
    family: FamilyChoice = option("auto", help="checked against the folder's model_index.json")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", help="dtype of the frozen weights"
    )
    revision: str | None = option(None, help="hub revision (ignored for local folders)")
    quantize: Quantize = option("none", help=f"the frozen transformer: {QUANTIZE_HELP}")
    text_encoder_quantize: Quantize = option(
        "none",
        help="the text encoder while it fills the cache (nf4 fits Mistral-3 24B in ~14 GB); cached "
        "embeddings are kept apart per setting",
    )
    fp8_storage: bool = option(
        False,
        help="retired (float8 without scales); use model.quantize: fp8",
        migrations={
            True: "retired: it stored weights in float8 without scales (6-11 % error); use model.quantize: fp8 "
            "(torchao float8 with per-row scales) instead"
        },
    )
    group_offload: Literal["none", "block", "leaf"] = option(
        "none",
        help="keep transformer weights in CPU RAM and move one block (or layer) at a time to the device",
    )
    allow_distilled: bool = option(
        False,
        help="train on a step-distilled checkpoint anyway (LoRAs trained on one "
        "come out weak or grey; train on the base checkpoint)",
    )

    def validate(self) -> list[str]:
        if not self.path:
            return [
                "model.path is empty; set it to a diffusers folder (e.g. one written by `flux2-lora tiny-model`) "
                "or a hub id"
            ]
        return []


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """A resolved base model: where it is, which family, and its model_index.json."""

    path: str
    family: Family
    index: dict[str, Any]
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()

    @property
    def distilled(self) -> bool:
        return bool(self.index.get("is_distilled", False))

    def transformer_config(self) -> dict[str, Any]:
        return json.loads(
            _fetch(self.path, "transformer/config.json", self.revision).read_text(encoding="utf-8")
        )

    def component_config(self, component: str) -> dict[str, Any]:
        return json.loads(
            _fetch(self.path, f"{component}/config.json", self.revision).read_text(encoding="utf-8")
        )

    def empty_transformer(self):
        """The transformer's architecture on the meta device: shapes and names, no weights read or allocated."""
        return empty_transformer(self.transformer_config())

    def empty_text_encoder(self):
        """The text encoder's architecture on the meta device (the planner counts it; nothing is read)."""
        import transformers
        from accelerate import init_empty_weights

        config = self.component_config("text_encoder")
        class_name = config.get("architectures", ["AutoModel"])[0]
        model_type = config["model_type"]
        cfg = transformers.AutoConfig.for_model(
            model_type, **{k: v for k, v in config.items() if k != "model_type"}
        )
        with init_empty_weights():
            model = getattr(transformers, class_name)(cfg)
        model.tie_weights()  # tied input/output embeddings (Qwen3-4B) are one tensor, as from_pretrained leaves them
        return model

    def identity(self, component: str) -> str:
        """A short hash of one component's files, used to key caches: a different model never hits them. Local
        folders: each file's name and size, its head (configs whole, weight headers), tail and four chunks between
        (a fine-tune of the same architecture differs there; hashing every byte of a 48 GB encoder would cost
        minutes each run). Hub ids: the commit the revision points to in the local hub cache, so a model updated
        on the hub misses (before its first download, the revision as given)."""
        h = hashlib.sha256(self.path.encode() if not self.is_local else b"")
        if self.is_local:
            folder = Path(self.path) / component
            for f in sorted(p for p in folder.rglob("*") if p.is_file()):
                h.update(f.relative_to(folder).as_posix().encode())
                size = f.stat().st_size
                h.update(str(size).encode())
                with open(f, "rb") as fh:
                    for offset in _sampled_offsets(size):
                        fh.seek(offset)
                        h.update(fh.read(_CHUNK))
        else:
            h.update(_hub_commit(self.path, self.revision or "main").encode())
        return h.hexdigest()[:16]


_CHUNK = 1 << 20


def _sampled_offsets(size: int) -> list[int]:
    """Where identity() reads a file: all of it up to 8 MiB; else the first 4 MiB, four 1 MiB chunks spread
    between, and the last 4 MiB."""
    if size <= 8 * _CHUNK:
        return list(range(0, size, _CHUNK))
    head = [i * _CHUNK for i in range(4)]
    middle = [size * k // 5 for k in range(1, 5)]
    tail = [size - (4 - i) * _CHUNK for i in range(4)]
    return head + middle + tail


def _hub_commit(repo_id: str, revision: str) -> str:
    """The commit `revision` of a hub repo resolves to in the local hub cache, or `revision` itself."""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    try:
        return ref.read_text().strip() or revision
    except OSError:
        return revision


def empty_transformer(config: dict[str, Any]):
    """A transformer config (FLUX.2 or FLUX.1) built on the meta device."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        return getattr(diffusers, config.get("_class_name", "Flux2Transformer2DModel")).from_config(
            config
        )


def _fetch(path: str, filename: str, revision: str | None = None) -> Path:
    local = Path(path)
    if (
        not local.is_dir()
        and filename.endswith(".json")
        and (shipped := shipped_config(path, filename))
    ):
        return shipped  # a known checkpoint's configs ship with the package: plan and check before any download
    if local.is_dir():
        target = local / filename
        if not target.is_file():
            raise UserError(
                f"model.path '{path}' has no {filename}; point it at a diffusers FLUX.2 folder"
            )
        return target
    looks_local = path.startswith((".", "/", "~")) or Path(path.split("/")[0]).is_dir()
    if looks_local and not local.exists():
        near = _close_folders(local)
        raise UserError(
            f"model.path '{path}': no such folder{f' (did you mean {near}?)' if near else ''}; "
            "fix the path (hub ids look like owner/name)"
        )
    if local.exists() or path.count("/") != 1:
        raise UserError(
            f"model.path '{path}' is not a folder or a hub id (owner/name); fix the path"
        )
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(path, filename, revision=revision))
    except Exception as exc:  # network, auth, offline mode: all one user-facing message
        reason = str(exc).splitlines()[0][:200]
        raise UserError(
            f"model.path '{path}': could not fetch {filename} from the hub ({reason}); "
            "use a local folder or check the id, token and network"
        ) from None


def _close_folders(path: Path) -> str:
    parent = path.expanduser().parent
    if not parent.is_dir():
        return ""
    names = [p.name for p in parent.iterdir() if p.is_dir()]
    close = difflib.get_close_matches(path.name, names, n=1)
    return f"'{parent / close[0]}'" if close else ""


def resolve_base_model(cfg: ModelConfig) -> BaseModel:
    index_file = _fetch(cfg.path, "model_index.json", cfg.revision)
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.path '{cfg.path}': model_index.json is unreadable ({exc}); re-download the model"
        ) from None
    class_name = index.get("_class_name", "")
    family = family_for_pipeline_class(class_name)
    if family is None:
        raise UserError(
            f"model.path '{cfg.path}' holds a {class_name or 'non-diffusers'} model, not FLUX.2 "
            f"(expected {' or '.join(f.pipeline_class_name for f in FAMILIES.values())})"
        )
    if cfg.family != "auto" and cfg.family != family.name:
        raise UserError(
            f"model.family is '{cfg.family}' but model.path '{cfg.path}' is a {family.name} model "
            f"({class_name}); set model.family: {family.name} (or auto)"
        )
    return BaseModel(path=cfg.path, family=family, index=index, revision=cfg.revision)


def load_pipeline(
    base: BaseModel,
    dtype: str = "float32",
    *,
    text_encoder: bool = True,
    vae: bool = True,
    transformer: bool = True,
    quantize: Quantize = "none",
    text_encoder_quantize: Quantize = "none",
    device_map: str | None = None,
):
    """Load the family's stock pipeline; components switched off are not read from disk at all. Quantised
    components are converted layer by layer as their weights are read (diffusers' and transformers' loaders).
    `device_map` ("cuda", "cpu"): weights go to that device as they are read, so RAM holds one checkpoint shard
    at a time instead of the whole model."""
    skip = {
        name: None
        for name, keep in (
            ("text_encoder", text_encoder),
            ("tokenizer", text_encoder),
            ("vae", vae),
            ("transformer", transformer),
        )
        if not keep
    }
    mapping = {}
    if transformer and quantize != "none":
        mapping["transformer"] = diffusers_config(quantize, DTYPES[dtype])
    if text_encoder and text_encoder_quantize != "none":
        mapping["text_encoder"] = transformers_config(text_encoder_quantize, DTYPES[dtype])
    if mapping:
        from diffusers import PipelineQuantizationConfig

        skip["quantization_config"] = PipelineQuantizationConfig(quant_mapping=mapping)
    if device_map:
        skip["device_map"] = device_map
    try:
        pipe = base.family.pipeline_class.from_pretrained(
            base.path, dtype=DTYPES[dtype], revision=base.revision, **skip
        )
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model.path '{base.path}': could not load the {base.family.name} pipeline ({reason})"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply_memory_options(transformer, cfg: ModelConfig, device: torch.device) -> None:
    """Memory savers for the frozen transformer, applied after the LoRA layers are added."""
    if cfg.group_offload != "none":
        transformer.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level" if cfg.group_offload == "block" else "leaf_level",
            num_blocks_per_group=1 if cfg.group_offload == "block" else None,
        )


def transformer_weights(base: BaseModel):
    """module name -> its base weight (float32), read lazily from the transformer's safetensors (one tensor at a
    time: exporting a DoRA reads only the layers it adapts). Local folders, or the hub's cached files."""
    from safetensors import safe_open

    folder = Path(base.path) / "transformer"
    if not base.is_local:
        try:
            from huggingface_hub import snapshot_download

            folder = (
                Path(
                    snapshot_download(
                        base.path, revision=base.revision, allow_patterns=["transformer/*"]
                    )
                )
                / "transformer"
            )
        except Exception as exc:  # network, auth, offline: one line
            reason = str(exc).splitlines()[0][:160]
            raise UserError(
                f"model '{base.path}': its transformer weights are not at hand ({reason}); "
                "pass a local folder"
            ) from None
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        where = {
            k: folder / f
            for k, f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()
        }
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(
                f"model '{base.path}' has no transformer weights (transformer/*.safetensors)"
            )
        where = {}
        for f in files:
            with safe_open(f, "pt") as fh:
                where.update(dict.fromkeys(fh.keys(), f))

    def weight(module: str) -> torch.Tensor:
        key = f"{module}.weight"
        if key not in where:
            raise UserError(
                f"model '{base.path}' has no {key}; it is not the model this LoRA was trained on"
            )
        with safe_open(where[key], "pt") as fh:
            return fh.get_tensor(key).float()

    return weight
