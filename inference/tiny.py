"""Tiny FLUX.2 pipelines built offline with the real diffusers/transformers classes.

They exist so that tests and the quickstart exercise exactly the code real users run, with no download:
the same pipeline classes, chat templates, hidden-state layers, latent normalisation and LoRA module names,
at a size that trains in seconds on a CPU. Two kinds:
- pretrained (the default): a slightly larger transformer and a VAE pretrained on the synthetic shapes world
  (common/synthetic.py) by scripts/pretrain_tiny.py; the weights ship in inference/tiny_weights with checksums.
  It draws "a red ring on a navy blue background", so a LoRA's effect can be seen and measured.
- random: the smallest model that runs, for tests that only need shapes and names. Same seed -> same files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from common.atomic import atomic_dir, atomic_path, write_text
from common.errors import UserError
from common.synthetic import vocabulary

WEIGHTS_DIR = Path(__file__).resolve().parent / "tiny_weights"
CHECKSUMS = "SHA256SUMS"
REBUILD = "python scripts/pretrain_tiny.py"

# A small corpus for the byte-level BPE tokenizer; words the quickstart captions and tests use are in it
# so prompts tokenize into a handful of pieces rather than raw bytes.
_CORPUS = """
a photo of a logo mark badge brand product bottle character style painting illustration portrait
red green blue yellow orange purple white black gray colour color hex background studio lighting
on a table in a city at night in the forest on the beach close up wide shot minimal flat design
the and with of in on at for to by from is are was sky sun water tree house street car dog cat person
You are an AI that reasons about image descriptions. You give structured responses focusing on object
relationships, object attribution and actions without speculation. sks ohwx zxq mark circle square
""" + vocabulary()

_DEV_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set parts = [{'type': 'text', 'text': m['content']}] %}"
    "{% else %}{% set parts = m['content'] %}{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]{% endif %}"
    "{% for p in parts %}{% if p['type'] == 'image' %}[IMG]{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% if m['role'] == 'system' %}[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[/INST]"
    "{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

_KLEIN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

TEXT_HIDDEN = 16


def _train_bpe(special_tokens: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


# transformer sizes: the random test model is the smallest that runs; the pretrained one has room to learn
# colours, shapes and placement (2 + 2 blocks, 4 heads 32 wide: ~1.6 M parameters). Heads 32 wide give each RoPE
# axis 4 frequencies (16 wide give 2, and tokens 6 apart look alike).
ARCHITECTURES = {
    "random": {
        "num_layers": 1,
        "num_single_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "axes_dims_rope": (4, 4, 4, 4),
    },
    "pretrained": {
        "num_layers": 2,
        "num_single_layers": 2,
        "num_attention_heads": 4,
        "attention_head_dim": 32,
        "axes_dims_rope": (8, 8, 8, 8),
    },
}
# The pretrained VAE downsamples 4x (three levels) instead of FLUX.2's 8x: a 64 px image is then 8 x 8 tokens and
# the brand mark's ring and bar survive the latent (at 8x it is 2-3 tokens wide and comes back as a smudge).
# The pipelines read the factor from block_out_channels; sides stay multiples of 16 as for the real model.
VAE_ARCHITECTURES = {
    "random": {"block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4},
    "pretrained": {"block_out_channels": (16, 32, 32), "norm_num_groups": 8},
}


def _tiny_transformer(guidance_embeds: bool, size: str):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        **ARCHITECTURES[size],
        joint_attention_dim=3 * TEXT_HIDDEN,
        timestep_guidance_channels=32,
        guidance_embeds=guidance_embeds,
    )


def _tiny_vae(size: str):
    from diffusers import AutoencoderKLFlux2

    levels = len(VAE_ARCHITECTURES[size]["block_out_channels"])
    vae = AutoencoderKLFlux2(
        **VAE_ARCHITECTURES[size],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        latent_channels=32,
        sample_size=64,
    )
    # Non-trivial normalisation statistics, so tests notice if training forgets to apply them.
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(128) * 0.1)
        vae.bn.running_var.copy_(torch.rand(128) + 0.5)
    return vae


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


def mistral3_text_stack():
    """dev's text encoder: Mistral-3 (with a Pixtral vision tower) and a PixtralProcessor."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessor,
        PixtralProcessor,
        PixtralVisionConfig,
        PreTrainedTokenizerFast,
    )

    specials = [
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
        "[INST]",
        "[/INST]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
        "[IMG]",
        "[IMG_BREAK]",
        "[IMG_END]",
    ]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(specials),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=2048,
    )
    fast.add_special_tokens({"additional_special_tokens": specials[4:]})
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": 64}, patch_size=16),
        tokenizer=fast,
        patch_size=16,
        spatial_merge_size=2,
        chat_template=_DEV_TEMPLATE,
    )
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=8,
            image_size=64,
            patch_size=16,
        ).to_dict(),
        text_config=MistralConfig(
            vocab_size=len(fast),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=30,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=2048,
            pad_token_id=fast.pad_token_id,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
        ).to_dict(),
        image_token_index=fast.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )
    return _loud_embeddings(Mistral3ForConditionalGeneration(config).eval()), processor


def qwen3_text_stack():
    """klein's text encoder: Qwen3 with a Qwen2 tokenizer."""
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    bpe = _train_bpe(specials)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2TokenizerFast(vocab=state["vocab"], merges=merges, model_max_length=2048)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = _KLEIN_TEMPLATE
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return _loud_embeddings(Qwen3ForCausalLM(config).eval()), tokenizer


def _loud_embeddings(model):
    """Token embeddings of unit scale instead of the 0.02 of a fresh init. The pipelines read unnormalised hidden
    states of middle layers, where a fresh tiny encoder's tokens are ~0.1 long: a transformer learns to read prompts
    from them only slowly. Real encoders are trained; this one stays random, so its scale is chosen here."""
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(50.0)
    return model


def build_tiny_pipeline(
    family,
    seed: int = 0,
    distilled: bool = False,
    pretrained: bool = False,
    size: str | None = None,
):
    """A stock pipeline of `family` (an inference.families.Family): random weights, or with `pretrained` the
    shipped weights (checked against their checksums). `size` overrides the architecture (the pretraining
    script builds the pretrained architecture with random weights)."""
    torch.manual_seed(seed)
    text_encoder, tokenizer = family.tiny_text_stack()
    size = size or ("pretrained" if pretrained else "random")
    transformer = _tiny_transformer(family.has_guidance_embedding, size)
    pipe = family.pipeline_class(
        scheduler=_scheduler(),
        vae=_tiny_vae(size),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        **family.pipeline_options(distilled),
    )
    if pretrained:
        _load_pretrained(pipe, family)
    return pipe


def write_tiny_model(
    out_dir: str | Path, family, seed: int = 0, distilled: bool = False, pretrained: bool = True
) -> Path:
    """Write a tiny pipeline folder (diffusers format, a few MB) atomically."""
    out_dir = Path(out_dir)
    pipe = build_tiny_pipeline(family, seed=seed, distilled=distilled, pretrained=pretrained)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp)
    return out_dir


def _load_pretrained(pipe, family) -> None:
    weights = load_weights(WEIGHTS_DIR / f"{family.name}.safetensors")
    components = {"vae": load_weights(WEIGHTS_DIR / "vae.safetensors")}
    for key, value in weights.items():
        component, name = key.split(".", 1)
        components.setdefault(component, {})[name] = value
    for component, state in components.items():
        try:  # strict: every tensor of the component, tied embeddings included, is in the file (save_weights)
            getattr(pipe, component).load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(
                f"the shipped {component} weights do not fit the tiny {family.name} model "
                f"({str(exc).splitlines()[0][:120]}); rebuild them with `{REBUILD} --family "
                f"{family.name}`"
            ) from None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A shipped weights file, refused unless its checksum is the recorded one."""
    from safetensors.torch import load_file

    sums = _read_checksums(path.parent)
    if not path.is_file() or path.name not in sums:
        raise UserError(f"{path} is missing; rebuild the tiny model's weights with `{REBUILD}`")
    if _sha256(path) != sums[path.name]:
        raise UserError(
            f"{path} is damaged (checksum mismatch with {path.parent / CHECKSUMS}); rebuild it with "
            f"`{REBUILD}` or restore it with `git checkout -- {path.name}`"
        )
    return load_file(path)


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    # clone: tied embeddings share storage, which safetensors refuses
    data = save({k: v.detach().clone().contiguous() for k, v in sorted(state.items())})
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_checksums(folder: Path) -> None:
    lines = [f"{_sha256(p)}  {p.name}\n" for p in sorted(folder.glob("*.safetensors"))]
    write_text(folder / CHECKSUMS, "".join(lines))


def _read_checksums(folder: Path) -> dict[str, str]:
    path = folder / CHECKSUMS
    if not path.is_file():
        return {}
    return {
        name: digest
        for digest, name in (line.split() for line in path.read_text().splitlines() if line.strip())
    }
