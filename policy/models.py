"""Model factory: Wan2.1 parts with random weights (`model.init=random`: the tiny CPU architecture or a real
one, policy/arch.py) or loaded from a local diffusers directory (`model.init=pretrained`, `model.path`).

Both paths produce the same diffusers classes in the same dtypes, so everything downstream (sampler, LoRA,
learner, pipelines) runs the same code on a laptop and on a cluster. The tiny sizes are the measured ones
of `../shared/CPU_STACK.md`: a forward pass takes milliseconds. A role builds only the parts it uses
(`parts`): the learner only the transformer.

A local directory uses the diffusers layout written by `WanPipeline.save_pretrained`:
    model_index.json, transformer/, vae/, text_encoder/, tokenizer/
`save_tiny_pretrained(dir, kind)` writes exactly that layout, so tests exercise the real loading path.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers import WanVACETransformer3DModel
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from config import ExpectedError
from policy.arch import (TINY_VOCAB, cast_like_pretrained, default_dtype, get_architecture, shape_differences,
                         text_encoder_config, transformer_config, vae_config)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TRANSFORMER_CLASSES = {"t2v": WanTransformer3DModel, "vace": WanVACETransformer3DModel,
                       "phantom": WanTransformer3DModel}
REQUIRED_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer")
# What a role builds: the rollout everything, the learner only the network it trains (prompt embeddings and
# the VACE / Phantom conditioning travel with each trajectory, so it needs no text encoder and no VAE).
POLICY_PARTS = ("tokenizer", "text_encoder", "vae", "transformer")
TRANSFORMER_ONLY = ("transformer",)

# A few sentences are enough for a byte-level BPE that encodes any prompt offline.
_TOKENIZER_CORPUS = [
    "a woman and a man talk in a kitchen, cinematic lighting",
    "two people walk along a beach at sunset, waves in the background",
    "a person smiles at the camera in a sunny park",
    "three friends laugh together at a cafe table",
    "portrait video of a person turning their head slowly",
]


class ModelPathError(ExpectedError, FileNotFoundError):
    """A local model directory is missing or incomplete; the message says what is missing."""


@dataclass
class WanComponents:
    """The parts a policy needs; `transformer` is the trainable one. Parts a role did not build are None."""

    kind: str
    tokenizer: Optional[PreTrainedTokenizerFast]
    text_encoder: Optional[UMT5EncoderModel]
    vae: Optional[AutoencoderKLWan]
    transformer: Optional[torch.nn.Module]
    scheduler: FlowMatchEulerDiscreteScheduler


# ----------------------------------------------------------------------------- random-init builders


@contextlib.contextmanager
def _seeded(seed: int):
    """Build under a fixed global seed, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


BANK = 1_048_573  # values in the random bank: a prime, so the rows of a weight of any width start at other places


@contextlib.contextmanager
def fast_random_fill():
    """Within the block, `Tensor.uniform_` and `Tensor.normal_` (what the modules' own initialisers call, with their
    own bounds and scales) copy from a fixed bank of random values, starting at a random place and wrapping around:
    per tensor the same distribution, at memory speed. torch's generator makes ~175M values/s on one core here,
    and a rehearsal's real-width layers took 12 s to initialise (14B), in each of its processes. The start is drawn
    from the global generator, which `_seeded` sets per part, so every process building a part gets the same
    weights. For the real architectures' random builds (rehearsals), not the tiny models."""
    gen = torch.Generator().manual_seed(0)
    banks = {"uniform": torch.rand(BANK, generator=gen), "normal": torch.randn(BANK, generator=gen)}
    originals = torch.Tensor.uniform_, torch.Tensor.normal_

    def fill(tensor, bank, scale, shift, original, *args, **kwargs):
        if not tensor.is_floating_point() or not tensor.is_contiguous():
            return original(tensor, *args, **kwargs)
        flat, pos, done = tensor.view(-1), int(torch.randint(BANK, (1,))), 0
        while done < flat.numel():
            take = min(flat.numel() - done, BANK - pos)
            flat[done:done + take].copy_(bank[pos:pos + take]).mul_(scale).add_(shift)
            done, pos = done + take, 0
        return tensor

    def uniform_(tensor, a=0.0, b=1.0, *, generator=None):
        return fill(tensor, banks["uniform"], b - a, a, originals[0], a, b, generator=generator)

    def normal_(tensor, mean=0.0, std=1.0, *, generator=None):
        return fill(tensor, banks["normal"], std, mean, originals[1], mean, std, generator=generator)

    torch.Tensor.uniform_, torch.Tensor.normal_ = uniform_, normal_
    try:
        yield
    finally:
        torch.Tensor.uniform_, torch.Tensor.normal_ = originals


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in milliseconds on a fixed corpus: deterministic, no downloads. Also the
    tokenizer of real architectures built with random weights (their ids must fit the reduced vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, TINY_VOCAB), special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    # UMT5 appends </s>, like the real Wan tokenizer.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def build_text_encoder(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> UMT5EncoderModel:
    with _seeded(seed), default_dtype(dtype):
        model = UMT5EncoderModel(UMT5Config(**config))
    return cast_like_pretrained(model, dtype).eval()


def build_vae(config: dict, seed: int = 0) -> AutoencoderKLWan:
    """Always float32, as on load: the Wan VAE is sensitive to bf16 (diffusers' Wan examples keep it so)."""
    with _seeded(seed + 1):
        return AutoencoderKLWan(**config).eval()


def build_transformer(kind: str, config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    if kind not in TRANSFORMER_CLASSES:
        raise ValueError(f"model.kind: unknown kind {kind!r}; expected one of {sorted(TRANSFORMER_CLASSES)}")
    with _seeded(seed + 2), default_dtype(dtype):
        model = TRANSFORMER_CLASSES[kind](**config)
    return cast_like_pretrained(model, dtype)


def build_tiny_text_encoder(seed: int = 0) -> UMT5EncoderModel:
    return build_text_encoder(text_encoder_config("tiny", "t2v"), seed)


def build_tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    return build_vae(vae_config("tiny", "t2v"), seed)


def build_tiny_transformer(kind: str, seed: int = 0) -> torch.nn.Module:
    if kind not in TRANSFORMER_CLASSES:
        raise ValueError(f"model.kind: unknown kind {kind!r}; expected one of {sorted(TRANSFORMER_CLASSES)}")
    return build_transformer(kind, transformer_config("tiny", kind), seed)


def build_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    """Wan's shifted flow-matching schedule (sigma from 1 to 0, shift s -> shift s / (1 + (shift-1) s))."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def build_random_components(arch: str, kind: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                            shift: float = 3.0, parts: Sequence[str] = POLICY_PARTS,
                            num_layers: Optional[int] = None, text_encoder_layers: Optional[int] = None,
                            text_encoder_vocab: Optional[int] = None) -> WanComponents:
    """Architecture `arch` (policy/arch.py) with random weights, seeded: every process that builds it gets
    the same weights. Dtypes as `from_pretrained(torch_dtype=dtype)` would leave them."""
    get_architecture(arch, kind)
    tokenizer = build_tiny_tokenizer() if "tokenizer" in parts or "text_encoder" in parts else None
    text_encoder = vae = transformer = None
    with fast_random_fill() if arch != "tiny" else contextlib.nullcontext():
        if "text_encoder" in parts:
            te_cfg = text_encoder_config(arch, kind, text_encoder_layers, text_encoder_vocab)
            if te_cfg["vocab_size"] < len(tokenizer):
                raise ValueError(f"model.text_encoder_vocab={te_cfg['vocab_size']} is below the offline tokenizer's "
                                 f"{len(tokenizer)} tokens")
            text_encoder = build_text_encoder(te_cfg, seed, dtype)
        if "vae" in parts:
            vae = build_vae(vae_config(arch, kind), seed)
        if "transformer" in parts:
            transformer = build_transformer(kind, transformer_config(arch, kind, num_layers), seed, dtype)
    return WanComponents(kind=kind, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                         scheduler=build_scheduler(shift))


def build_tiny_components(kind: str, seed: int = 0, shift: float = 3.0) -> WanComponents:
    return build_random_components("tiny", kind, seed, torch.float32, shift)


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


def check_pretrained_dir(path: str | Path, parts: Sequence[str] = POLICY_PARTS) -> Path:
    """Fail early, naming the missing piece, instead of deep inside from_pretrained."""
    path = Path(path)
    if not path.is_dir():
        raise ModelPathError(f"model.path: directory not found: {path}")
    missing = [name for name in REQUIRED_SUBFOLDERS if name in parts and not (path / name).is_dir()]
    if missing:
        raise ModelPathError(f"model.path: {path} is missing subfolder(s) {missing} "
                             f"(expected the diffusers layout: {list(REQUIRED_SUBFOLDERS)})")
    for name in ("transformer", "vae", "text_encoder"):
        if name not in parts:
            continue
        sub = path / name
        if not (sub / "config.json").is_file():
            raise ModelPathError(f"model.path: {sub} has no config.json")
        if not any(sub.glob("*.safetensors")) and not any(sub.glob("*.bin")):
            raise ModelPathError(f"model.path: {sub} has no weight files (*.safetensors or *.bin)")
    return path


def load_pretrained_components(path: str | Path, kind: str, dtype: torch.dtype = torch.float32,
                               shift: float = 3.0, parts: Sequence[str] = POLICY_PARTS) -> WanComponents:
    """Load real (or saved tiny) models from a local diffusers directory; never touches a hub."""
    path = check_pretrained_dir(path, parts)
    common = dict(local_files_only=True)
    load = lambda name, fn: fn() if name in parts else None  # noqa: E731
    components = WanComponents(
        kind=kind,
        tokenizer=load("tokenizer", lambda: PreTrainedTokenizerFast.from_pretrained(path / "tokenizer", **common)),
        text_encoder=load("text_encoder", lambda: UMT5EncoderModel.from_pretrained(
            path / "text_encoder", dtype=dtype, **common).eval()),
        # The Wan VAE is kept in float32, as diffusers' Wan examples do: it is sensitive to bf16.
        vae=load("vae", lambda: AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=torch.float32,
                                                                 **common).eval()),
        transformer=load("transformer", lambda: TRANSFORMER_CLASSES[kind].from_pretrained(
            path / "transformer", torch_dtype=dtype, **common)),
        scheduler=build_scheduler(shift),
    )
    for module in (components.text_encoder, components.vae, components.transformer):
        if module is not None:
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


def build_components(model_cfg, shift: float = 3.0, parts: Sequence[str] = POLICY_PARTS) -> WanComponents:
    """From a `model` config section: `model.arch` with random weights (`model.init=random`), or the local
    directory `model.path` (`model.init=pretrained`), checked against `model.arch` when one is named."""
    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.init == "random":
        return build_random_components(model_cfg.arch, model_cfg.kind, model_cfg.tiny_seed, dtype, shift, parts,
                                       model_cfg.num_layers, model_cfg.text_encoder_layers,
                                       model_cfg.text_encoder_vocab)
    components = load_pretrained_components(model_cfg.path, model_cfg.kind, dtype, shift, parts)
    if model_cfg.kind == "phantom" and model_cfg.phantom_checkpoint and components.transformer is not None:
        from policy.phantom_convert import load_phantom_checkpoint

        load_phantom_checkpoint(components.transformer, model_cfg.phantom_checkpoint)
    if model_cfg.arch and components.transformer is not None:
        expected = transformer_config(model_cfg.arch, model_cfg.kind)
        diff = shape_differences(expected, dict(components.transformer.config))
        if diff:
            raise ModelPathError(f"model.path {model_cfg.path}: its transformer is not model.arch={model_cfg.arch} "
                                 f"(config key: expected vs found) {diff}")
    return components


def pipeline_for(components: WanComponents):
    """The matching diffusers pipeline over the same module objects (used for interop and tests)."""
    from diffusers import WanPipeline, WanVACEPipeline

    cls = WanVACEPipeline if components.kind == "vace" else WanPipeline
    return cls(tokenizer=components.tokenizer, text_encoder=components.text_encoder, vae=components.vae,
               transformer=components.transformer, scheduler=components.scheduler)
