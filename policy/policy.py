"""Diffusion policies over diffusers' Wan classes: text-to-video, VACE and Phantom.

A policy turns (prompt, reference images) into a `Condition` once per prompt group, and then gives the
classifier-free-guided velocity for any latents and sigma, with the trainable weights or with the
frozen reference (LoRA adapters disabled, or a frozen copy when fine-tuning fully).

How references enter the model:
- t2v: they do not.
- VACE: as in diffusers' `WanVACEPipeline` (whose own preprocessing helpers we call, so the two agree):
  each reference is VAE-encoded and prepended as an extra leading latent frame of the control input
  (inactive/reactive halves + 64 mask channels); the noisy latents get as many extra leading frames,
  which are stripped after denoising.
- Phantom (Phantom-video/Phantom, `phantom_wan/subject2video.py`): each reference is padded (white)
  to the video size, VAE-encoded on its own as one latent frame, normalised, and appended *after* the
  video frames. Those slots always hold the clean reference latents; their predictions are discarded,
  so the SDE state is the video latents alone. CFG has three terms:
      v = v(neg text, zero refs) + w_img (v(neg text, refs) - v(neg text, zero refs))
                                 + w_text (v(text, refs) - v(neg text, refs))
  t2v and VACE use the usual v = v_uncond + w (v_cond - v_uncond). All terms go in one batched forward.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from policy.lora import adapters_disabled, add_lora, has_lora
from policy.models import DTYPES, WanComponents, pipeline_for
from policy.precision import set_policy_dtypes
from policy.sde import host_to_device



def guided_passes(kind: str, sampler_cfg) -> int:
    """Transformer passes per denoising step: 2 with classifier-free guidance (conditional and unconditional), 3 for
    Phantom's text + image guidance, 1 without guidance (`sampler.guidance_scale` 1, and for Phantom also
    `sampler.image_guidance_scale` 1: CFG-free training, Flow-GRPO's; at 1 the guided velocity *is* the conditional
    one, so the single pass computes it exactly, as diffusers' Wan pipelines do for a guidance scale of 1)."""
    image = float(sampler_cfg.image_guidance_scale) > 1.0 if kind == "phantom" else False
    if float(sampler_cfg.guidance_scale) <= 1.0 and not image:
        return 1
    return 3 if kind == "phantom" else 2


@dataclass
class Condition:
    """Everything besides latents and sigma that the transformer needs, for one prompt (batch 1)."""

    prompt_embeds: torch.Tensor  # (1, L, D)
    negative_embeds: Optional[torch.Tensor]  # (1, L, D); None without classifier-free guidance
    latent_shape: tuple  # (C, F, h, w) of the SDE state
    control: Optional[torch.Tensor] = None  # VACE (1, 96, F, h, w)
    ref_latents: Optional[torch.Tensor] = None  # Phantom (1, C, K, h, w)
    num_ref_frames: int = 0  # leading latent frames stripped before decoding (VACE)

    def to(self, device) -> "Condition":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, prompt_embeds=move(self.prompt_embeds), negative_embeds=move(self.negative_embeds),
                       control=move(self.control), ref_latents=move(self.ref_latents))


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"reference image must be uint8 (H, W, 3), got {array.dtype} {array.shape}")
    return Image.fromarray(array)


class WanPolicy:
    """Holds the Wan components; `transformer` is the trainable network."""

    def __init__(self, components: WanComponents, model_cfg, sampler_cfg, device="cpu"):
        self.kind = components.kind
        self.components = components
        self.model_cfg, self.sampler_cfg = model_cfg, sampler_cfg
        self.passes_per_step = guided_passes(self.kind, sampler_cfg)
        self.device = torch.device(device)
        self.transformer = components.transformer.to(self.device)
        for part in (components.text_encoder, components.vae):
            if part is not None:
                part.to(self.device)
        # A container whose helpers we reuse, never run; a learner (transformer only) encodes nothing.
        self.pipeline = pipeline_for(components) if components.text_encoder is not None else None
        self.reference_transformer = None
        if model_cfg.lora.enabled:
            if not has_lora(self.transformer):
                add_lora(self.transformer, model_cfg.lora)
        else:
            self.transformer.requires_grad_(True)
        # Every parameter in the dtype both roles compute in (policy/precision.py), before the reference copy.
        set_policy_dtypes(self.transformer, DTYPES[model_cfg.dtype], lora=model_cfg.lora.enabled)
        if not model_cfg.lora.enabled:
            # Full fine-tuning: the reference is a frozen copy taken before any update.
            self.reference_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        if model_cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    def _needs(self, part: str):
        module = getattr(self.components, part)
        if module is None:
            raise RuntimeError(f"this {self.kind} policy was built without its {part} (a learner builds only the "
                               "transformer: conditions and videos come with the trajectories)")
        return module

    # ------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def encode_condition(self, prompt: str, references: Sequence = ()) -> Condition:
        cfg = self.model_cfg
        self._needs("text_encoder")
        prompt_embeds, negative_embeds = self.pipeline.encode_prompt(
            prompt=prompt, negative_prompt=self.sampler_cfg.negative_prompt,
            do_classifier_free_guidance=self.passes_per_step > 1,
            max_sequence_length=self.sampler_cfg.max_sequence_length, device=self.device,
            dtype=self.transformer.dtype)
        z = self.components.vae.config.z_dim
        frames = (cfg.num_frames - 1) // self.pipeline.vae_scale_factor_temporal + 1
        h = cfg.height // self.pipeline.vae_scale_factor_spatial
        w = cfg.width // self.pipeline.vae_scale_factor_spatial
        cond = Condition(prompt_embeds, negative_embeds, latent_shape=(z, frames, h, w))
        references = [_to_pil(r) for r in references]
        if len(references) > cfg.max_references:
            raise ValueError(f"{len(references)} reference images exceed model.max_references={cfg.max_references}")
        if self.kind == "t2v":
            return cond
        if not references:
            raise ValueError(f"model.kind={self.kind} needs at least one reference image for prompt {prompt!r}")
        if self.kind == "vace":
            return self._vace_condition(cond, references)
        return self._phantom_condition(cond, references)

    def _vace_condition(self, cond: Condition, references: List[Image.Image]) -> Condition:
        pipe, cfg = self.pipeline, self.model_cfg
        video, mask, refs = pipe.preprocess_conditions(
            None, None, references, 1, cfg.height, cfg.width, cfg.num_frames, torch.float32, self.device)
        control = pipe.prepare_video_latents(video, mask, refs, None, self.device)
        z, frames, h, w = cond.latent_shape
        k = len(references)
        # The video's mask channels from diffusers' helper, then zeros for the K reference frames. (diffusers
        # 0.42's `prepare_masks` pads with `zeros_like(mask[:, :K])`, which is short when K exceeds the latent
        # frames, e.g. 3 people in a 5-frame clip; for K <= frames both are the same.)
        masks = pipe.prepare_masks(mask, [[] for _ in refs], None)
        masks = torch.cat([masks.new_zeros(masks.shape[0], masks.shape[1], k, *masks.shape[3:]), masks], dim=2)
        control = torch.cat([control, masks], dim=1).to(self.transformer.dtype)
        return replace(cond, control=control, num_ref_frames=k, latent_shape=(z, frames + k, h, w))

    def _phantom_condition(self, cond: Condition, references: List[Image.Image]) -> Condition:
        cfg, vae = self.model_cfg, self._needs("vae")
        latents = []
        for image in references:
            pixels = _pad_to_canvas(image, cfg.height, cfg.width).to(self.device, vae.dtype)
            latent = vae.encode(pixels[None, :, None]).latent_dist.mode()
            latents.append(normalize_latents(vae, latent))
        return replace(cond, ref_latents=torch.cat(latents, dim=2).to(self.transformer.dtype))

    # ------------------------------------------------------------------ velocity

    @contextlib.contextmanager
    def reference(self):
        """Within this block `velocity(..., reference=True)` style calls use the frozen reference."""
        if self.reference_transformer is not None:
            yield self.reference_transformer
        else:
            with adapters_disabled(self.transformer) as frozen:
                yield frozen

    def velocity(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Condition,
                 reference: bool = False) -> torch.Tensor:
        """Guided velocity for latents (B, C, F, h, w) at per-sample transformer timesteps (B,), in [0, 1000]
        (the schedule's, policy/schedule.py), one batched forward."""
        if reference:
            with self.reference() as model:
                return self._guided(model, latents, timestep, cond)
        return self._guided(self.transformer, latents, timestep, cond)

    def _guided(self, model, latents, timestep, cond: Condition) -> torch.Tensor:
        batch = latents.shape[0]
        dtype = model.dtype if hasattr(model, "dtype") else self.transformer.dtype
        x = latents.to(dtype)
        timestep = host_to_device(torch.as_tensor(timestep, dtype=torch.float32), x.device).expand(batch)
        pos = cond.prompt_embeds.expand(batch, -1, -1)
        w = self.sampler_cfg.guidance_scale
        if self.passes_per_step == 1:  # no guidance: the conditional velocity, one pass
            kwargs = {}
            if self.kind == "phantom":
                x = torch.cat([x, cond.ref_latents.expand(batch, -1, -1, -1, -1).to(dtype)], dim=2)
            elif cond.control is not None:
                kwargs["control_hidden_states"] = cond.control.expand(batch, -1, -1, -1, -1)
            out = model(hidden_states=x, timestep=timestep, encoder_hidden_states=pos, return_dict=False, **kwargs)[0]
            return out[:, :, : latents.shape[2]].float()
        neg = cond.negative_embeds.expand(batch, -1, -1)
        if self.kind == "phantom":
            refs = cond.ref_latents.expand(batch, -1, -1, -1, -1).to(dtype)
            with_refs = torch.cat([x, refs], dim=2)
            zero_refs = torch.cat([x, torch.zeros_like(refs)], dim=2)
            out = model(hidden_states=torch.cat([with_refs, with_refs, zero_refs]),
                        timestep=timestep.repeat(3), encoder_hidden_states=torch.cat([pos, neg, neg]),
                        return_dict=False)[0][:, :, : x.shape[2]]
            text, image, uncond = out.float().chunk(3)
            w_img = self.sampler_cfg.image_guidance_scale
            return uncond + w_img * (image - uncond) + w * (text - image)
        kwargs = {}
        if cond.control is not None:
            kwargs["control_hidden_states"] = cond.control.expand(2 * batch, -1, -1, -1, -1)
        out = model(hidden_states=torch.cat([x, x]), timestep=timestep.repeat(2),
                    encoder_hidden_states=torch.cat([pos, neg]), return_dict=False, **kwargs)[0]
        v_cond, v_uncond = out.float().chunk(2)
        return v_uncond + w * (v_cond - v_uncond)

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Final latents -> uint8 video (B, F, H, W, 3); VACE's reference frames are stripped first.

        `model.vae_decode_batch` videos at a time: the VAE's activations at full resolution dominate a
        rollout's peak memory, and a video decodes alone as in a batch (up to float rounding: a rare pixel
        1/255 apart, tests/test_policy.py)."""
        vae = self._needs("vae")
        latents = latents[:, :, cond.num_ref_frames:].to(vae.dtype)
        step = max(1, int(self.model_cfg.vae_decode_batch))
        out = []
        for i in range(0, latents.shape[0], step):
            video = vae.decode(denormalize_latents(vae, latents[i:i + step]), return_dict=False)[0]  # (b, 3, F, H, W)
            video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out.append(video.permute(0, 2, 3, 4, 1).cpu())
        return torch.cat(out)


def _latent_stats(vae, like: torch.Tensor):
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=torch.float32).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=torch.float32).view(shape)
    return mean, std


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the model's latent space (diffusers' Wan pipelines normalise the same way)."""
    mean, std = _latent_stats(vae, latents)
    return ((latents.float() - mean) / std).to(latents.dtype)


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    mean, std = _latent_stats(vae, latents)
    return (latents.float() * std + mean).to(latents.dtype)


def _pad_to_canvas(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Phantom's reference preprocessing: fit inside (H, W) keeping aspect, centre on white, [-1, 1]."""
    scale = min(width / image.width, height / image.height)
    new_w, new_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((new_w, new_h), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))
    pixels = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255.0
    return pixels * 2 - 1
