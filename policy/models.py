"""Model factory: tiny random-init Wan2.1 parts for CPU, real ones from a local diffusers directory.

Both paths produce the same diffusers classes, so everything downstream (sampler, LoRA, learner,
pipelines) runs the same code on a laptop and on a cluster. The tiny sizes are the measured ones of
`../shared/CPU_STACK.md`: a forward pass takes milliseconds.

A local directory uses the diffusers layout written by `WanPipeline.save_pretrained`:
    model_index.json, transformer/, vae/, text_encoder/, tokenizer/
`save_tiny_pretrained(dir, kind)` writes exactly that layout, so tests exercise the real loading path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers import WanVACETransformer3DModel
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TINY_TEXT_DIM = 32
TINY_VOCAB = 297

TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
    out_channels=16, text_dim=TINY_TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
# VACE: control = 2 x z_dim latent channels (inactive, reactive) + 64 mask channels (8x8 pixels).
TINY_VACE = dict(TINY_TRANSFORMER, num_layers=3, vace_layers=[0, 2], vace_in_channels=96)
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True])
TINY_TEXT_ENCODER = dict(vocab_size=TINY_VOCAB, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2,
                         num_heads=4, relative_attention_num_buckets=8)

TRANSFORMER_CLASSES = {"t2v": WanTransformer3DModel, "vace": WanVACETransformer3DModel,
                       "phantom": WanTransformer3DModel}
REQUIRED_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer")

# A few sentences are enough for a byte-level BPE that encodes any prompt offline.
_TOKENIZER_CORPUS = [
    "a woman and a man talk in a kitchen, cinematic lighting",
    "two people walk along a beach at sunset, waves in the background",
    "a person smiles at the camera in a sunny park",
    "three friends laugh together at a cafe table",
    "portrait video of a person turning their head slowly",
]


class ModelPathError(FileNotFoundError):
    """A local model directory is missing or incomplete; the message says what is missing."""


@dataclass
class WanComponents:
    """The parts a policy needs; `transformer` is the trainable one."""

    kind: str
    tokenizer: PreTrainedTokenizerFast
    text_encoder: UMT5EncoderModel
    vae: AutoencoderKLWan
    transformer: torch.nn.Module
    scheduler: FlowMatchEulerDiscreteScheduler


# ----------------------------------------------------------------------------- tiny builders


def _seeded(seed: int):
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    return gen_state


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in milliseconds on a fixed corpus: deterministic, no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    # UMT5 appends </s>, like the real Wan tokenizer.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def build_tiny_text_encoder(seed: int = 0) -> UMT5EncoderModel:
    state = _seeded(seed)
    model = UMT5EncoderModel(UMT5Config(**TINY_TEXT_ENCODER))
    torch.random.set_rng_state(state)
    return model.eval()


def build_tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    state = _seeded(seed + 1)
    model = AutoencoderKLWan(**TINY_VAE)
    torch.random.set_rng_state(state)
    return model.eval()


def build_tiny_transformer(kind: str, seed: int = 0) -> torch.nn.Module:
    if kind not in TRANSFORMER_CLASSES:
        raise ValueError(f"model.kind: unknown kind {kind!r}; expected one of {sorted(TRANSFORMER_CLASSES)}")
    state = _seeded(seed + 2)
    config = TINY_VACE if kind == "vace" else TINY_TRANSFORMER
    model = TRANSFORMER_CLASSES[kind](**config)
    torch.random.set_rng_state(state)
    return model


def build_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    """Wan's shifted flow-matching schedule (sigma from 1 to 0, shift s -> shift s / (1 + (shift-1) s))."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def build_tiny_components(kind: str, seed: int = 0, shift: float = 3.0) -> WanComponents:
    return WanComponents(
        kind=kind, tokenizer=build_tiny_tokenizer(), text_encoder=build_tiny_text_encoder(seed),
        vae=build_tiny_vae(seed), transformer=build_tiny_transformer(kind, seed),
        scheduler=build_scheduler(shift),
    )


# ----------------------------------------------------------------------------- disk


def save_pretrained(components: WanComponents, directory: str | Path) -> Path:
    """Write the diffusers layout (the same one `WanPipeline.save_pretrained` writes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from policy.lora import base_model_copy

    base_model_copy(components.transformer).save_pretrained(directory / "transformer")  # adapters not saved
    components.vae.save_pretrained(directory / "vae")
    components.text_encoder.save_pretrained(directory / "text_encoder")
    components.tokenizer.save_pretrained(directory / "tokenizer")
    components.scheduler.save_pretrained(directory / "scheduler")
    pipeline_class = "WanVACEPipeline" if components.kind == "vace" else "WanPipeline"
    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": _diffusers_version(),
        "tokenizer": ["transformers", type(components.tokenizer).__name__],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "transformer": ["diffusers", type(components.transformer).__name__],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    return directory


def save_tiny_pretrained(directory: str | Path, kind: str = "vace", seed: int = 0) -> Path:
    return save_pretrained(build_tiny_components(kind, seed), directory)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def check_pretrained_dir(path: str | Path) -> Path:
    """Fail early, naming the missing piece, instead of deep inside from_pretrained."""
    path = Path(path)
    if not path.is_dir():
        raise ModelPathError(f"model.path: directory not found: {path}")
    missing = [name for name in REQUIRED_SUBFOLDERS if not (path / name).is_dir()]
    if missing:
        raise ModelPathError(f"model.path: {path} is missing subfolder(s) {missing} "
                             f"(expected the diffusers layout: {list(REQUIRED_SUBFOLDERS)})")
    for name in ("transformer", "vae", "text_encoder"):
        sub = path / name
        if not (sub / "config.json").is_file():
            raise ModelPathError(f"model.path: {sub} has no config.json")
        if not any(sub.glob("*.safetensors")) and not any(sub.glob("*.bin")):
            raise ModelPathError(f"model.path: {sub} has no weight files (*.safetensors or *.bin)")
    return path


def load_pretrained_components(path: str | Path, kind: str, dtype: torch.dtype = torch.float32,
                               shift: float = 3.0) -> WanComponents:
    """Load real (or saved tiny) models from a local diffusers directory; never touches a hub."""
    path = check_pretrained_dir(path)
    transformer_cls = TRANSFORMER_CLASSES[kind]
    common = dict(local_files_only=True)
    components = WanComponents(
        kind=kind,
        tokenizer=PreTrainedTokenizerFast.from_pretrained(path / "tokenizer", **common),
        text_encoder=UMT5EncoderModel.from_pretrained(path / "text_encoder", dtype=dtype, **common).eval(),
        # The Wan VAE is kept in float32, as diffusers' Wan examples do: it is sensitive to bf16.
        vae=AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=torch.float32, **common).eval(),
        transformer=transformer_cls.from_pretrained(path / "transformer", torch_dtype=dtype, **common),
        scheduler=build_scheduler(shift),
    )
    for module in (components.text_encoder, components.vae, components.transformer):
        own_storage(module)
    return components


def own_storage(module: torch.nn.Module) -> torch.nn.Module:
    """Copy parameters out of the loader's (memory-mapped, unaligned) buffers into fresh tensors.

    safetensors loading leaves parameters as views at arbitrary byte offsets; CPU kernels pick
    different SIMD paths for unaligned data, so outputs differ from the saved model in the last bits.
    Owned, freshly allocated tensors make a loaded model bit-identical to the one that was saved.
    """
    with torch.no_grad():
        for param in module.parameters():
            param.data = param.data.clone()
        for buffer in module.buffers():
            buffer.data = buffer.data.clone()
    return module


def build_components(model_cfg, shift: float = 3.0) -> WanComponents:
    """From a `model` config section: tiny random init when `model.path` is unset, else local load."""
    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.path:
        components = load_pretrained_components(model_cfg.path, model_cfg.kind, dtype, shift)
    else:
        components = build_tiny_components(model_cfg.kind, model_cfg.tiny_seed, shift)
        if dtype != torch.float32:
            components.transformer.to(dtype)
            components.text_encoder.to(dtype)
    if model_cfg.kind == "phantom" and getattr(model_cfg, "phantom_checkpoint", None):
        from policy.phantom_convert import load_phantom_checkpoint

        load_phantom_checkpoint(components.transformer, model_cfg.phantom_checkpoint)
    return components


def pipeline_for(components: WanComponents):
    """The matching diffusers pipeline over the same module objects (used for interop and tests)."""
    from diffusers import WanPipeline, WanVACEPipeline

    cls = WanVACEPipeline if components.kind == "vace" else WanPipeline
    return cls(tokenizer=components.tokenizer, text_encoder=components.text_encoder, vae=components.vae,
               transformer=components.transformer, scheduler=components.scheduler)
