"""The models, optimizer and timer bench/gpu_wan.py times: Wan2.1's published transformer configs at random init,
a real WanPolicy around one, AdamW over fp32 master weights, and a device-synchronised phase timer. Shared with
bench/gpu_wan_flops.py's activation measurement."""

from __future__ import annotations

import time
from typing import List, Sequence

import torch

from config import LoraConfig, ModelConfig, SamplerConfig
from policy.arch import TINY_TRANSFORMER, transformer_config
from policy.models import WanComponents, build_scheduler, build_tiny_text_encoder, build_tiny_tokenizer, build_tiny_vae
from policy.policy import WanPolicy

# Wan2.1 T2V 1.3B and 14B: the published transformer configs (policy/architectures/, sources in its SOURCES.md).
WAN21_1_3B = transformer_config("wan2.1-t2v-1.3b", "t2v")
WAN21_14B = transformer_config("wan2.1-t2v-14b", "t2v")  # used by the memory plan only

SIZES = {
    "tiny": dict(transformer=TINY_TRANSFORMER, text_len=16, frames=9, height=64, width=64, group=4, steps=4,
                 dtype="float32", device="cpu"),
    "1.3b": dict(transformer=WAN21_1_3B, text_len=512, frames=33, height=240, width=416, group=8, steps=25,
                 dtype="bfloat16", device="cuda"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# ----------------------------------------------------------------------------- model and policy


def build_transformer(cfg: dict, device, dtype: torch.dtype, seed: int):
    """Random-init WanTransformer3DModel built on the device, cast like from_pretrained(torch_dtype=dtype)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**cfg)
    keep = model._keep_in_fp32_modules or []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if dtype != torch.float32 and not any(k in name.split(".") for k in keep):
                param.data = param.data.to(dtype)
    return model


def make_policy(transformer, args, lora: bool, ckpt: bool) -> WanPolicy:
    """A real WanPolicy around the big transformer (tiny tokenizer/text encoder/VAE: never run here)."""
    model_cfg = ModelConfig(kind="t2v", dtype=args.dtype, height=args.height, width=args.width,
                            num_frames=args.frames, gradient_checkpointing=ckpt,
                            lora=LoraConfig(enabled=lora, rank=args.lora_rank, alpha=float(args.lora_rank),
                                            target_modules=list(LORA_TARGETS)))
    sampler_cfg = SamplerConfig(num_steps=args.steps, guidance_scale=args.cfg, shift=args.shift,
                                max_sequence_length=args.text_len)
    components = WanComponents(kind="t2v", tokenizer=build_tiny_tokenizer(), text_encoder=build_tiny_text_encoder(),
                               vae=build_tiny_vae(), transformer=transformer, scheduler=build_scheduler(args.shift))
    policy = WanPolicy(components, model_cfg, sampler_cfg, device=args.device)
    for model in (policy.transformer, policy.reference_transformer):
        if model is None:
            continue
        if args.attn_backend != "native":
            model.set_attention_backend(args.attn_backend)
        if args.compile:
            model.compile_repeated_blocks(dynamic=False)
    return policy


class MasterAdamW:
    """AdamW over fp32 master copies of low-precision parameters (DeepSpeed bf16 keeps the same states)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.weight_decay = lr, weight_decay
        self.opt = None
        self.masters: List[torch.Tensor] = []

    def _build(self):
        self.masters = [p if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        fused = self.params[0].device.type == "cuda"
        self.opt = torch.optim.AdamW(self.masters, lr=self.lr, weight_decay=self.weight_decay, fused=fused)

    def step(self, max_norm: float) -> float:
        """Clip (norm computed in fp32 over the master gradients, as DeepSpeed does) and step; returns
        the gradient norm before clipping."""
        if self.opt is None:
            self._build()
        for master, p in zip(self.masters, self.params):
            if master is not p:
                master.grad = None if p.grad is None else p.grad.float()
        norm = torch.nn.utils.clip_grad_norm_(self.masters, max_norm)
        self.opt.step()
        with torch.no_grad():
            for master, p in zip(self.masters, self.params):
                if master is not p:
                    p.copy_(master)
        return float(norm)

    def zero_grad(self):
        for master, p in zip(self.masters, self.params):
            p.grad = None
            master.grad = None
        for p in self.params:
            p.grad = None

    def timed_step(self, max_norm: float, device: torch.device) -> dict:
        """The end of a training pass (ours and naive): step and zero_grad, timed with the device
        synchronised at both ends."""
        sync(device)
        t0 = time.perf_counter()
        grad_norm = self.step(max_norm)
        self.zero_grad()
        sync(device)
        return {"grad_norm": grad_norm, "optimizer_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phase:
    """Wall time with the device synchronised at both ends; peak memory allocated within (CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds, self.peak_bytes, self.start_bytes = 0.0, None, None

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        return False
