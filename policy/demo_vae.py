"""The demo VAE: a tiny Wan VAE *trained* to reconstruct demo clips, so the CPU demo can learn.

Why: a tiny random-init `AutoencoderKLWan` decodes every latent to almost the same picture. Measured
on the 32x32 demo size, moving the latents along the direction that brightens the video most changes
the mean decoded intensity by 0.0002 per unit of latent (L2), so no pixel-space reward gives the policy
a signal (README, "Demo"). A few hundred steps of reconstruction training on the demo's own kind of
clips (real face photographs pasted on real backgrounds, with random brightness and colour casts, so
colour must pass through the latents) raise that about a hundredfold, and then GRPO visibly moves
pixel-space rewards in minutes.

The trained weights ship in the repository (`policy/assets/demo_vae/`, about 0.3 MB, diffusers
format) so that `make demo` does not spend its budget on training; this module rebuilds them:

    .venv/bin/python -m policy.demo_vae --out policy/assets/demo_vae --steps 800

Its `latents_mean` / `latents_std` config entries are measured on demo clips, as Wan's are on real
videos, so the policy's latent space is normalised as it would be with production weights.
Demo only: this VAE says nothing about real video quality.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from policy.arch import TINY_VAE

DEMO_VAE = dict(TINY_VAE, base_dim=8)
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "demo_vae"


class DemoClips:
    """Random demo-like clips (F, H, W) in [-1, 1]: 1-3 faces on a background, drifting, then a random
    brightness gain and per-channel colour offset (and 1 in 5 a flat colour field)."""

    def __init__(self, num_frames: int, height: int, width: int, seed: int):
        from data.demo import background_photos, crop_face, load_face_photos

        photos = load_face_photos()
        self.faces = [crop_face(p.image, p.face_box, margin=0.15, size=96) for p in photos]
        self.backgrounds = background_photos()
        self.shape = (num_frames, height, width)
        self.rng = np.random.default_rng(seed)

    def one(self) -> torch.Tensor:
        from data.demo import compose_clip

        rng, (frames, height, width) = self.rng, self.shape
        if rng.random() < 0.2:
            video = np.broadcast_to(rng.uniform(0, 255, 3), (frames, height, width, 3)).astype(np.float32)
            video = video + rng.normal(0, 8, video.shape)
        else:
            ids = rng.permutation(len(self.faces))[: int(rng.integers(1, 4))]
            background = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
            video, _ = compose_clip([self.faces[j] for j in ids], background, frames, height, width, rng)
        pixels = torch.from_numpy(np.asarray(video, dtype=np.float32)).permute(3, 0, 1, 2) / 127.5 - 1
        gain, offset = rng.uniform(0.5, 1.3), rng.uniform(-0.4, 0.4, size=(3, 1, 1, 1))
        return (pixels * gain + torch.from_numpy(offset).float()).clamp(-1, 1)

    def batch(self, n: int) -> torch.Tensor:
        return torch.stack([self.one() for _ in range(n)])


def train_demo_vae(steps: int = 800, batch_size: int = 4, lr: float = 2e-3, kl_weight: float = 1e-3,
                   num_frames: int = 9, size: int = 32, seed: int = 0,
                   log_every: Optional[int] = 100) -> AutoencoderKLWan:
    """Reconstruction (+ a small KL) training of a tiny Wan VAE on demo clips; seeded, CPU."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**DEMO_VAE)
    clips = DemoClips(num_frames, size, size, seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 10)
    start = time.perf_counter()
    for step in range(steps):
        x = clips.batch(batch_size)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = (recon - x).pow(2).mean()
        loss = mse + kl_weight * posterior.kl().mean() / x[0].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[demo_vae] step {step} mse {mse.item():.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
    vae.eval()
    mean, std = latent_stats(vae, clips.batch(32))
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return vae


@torch.no_grad()
def latent_stats(vae: AutoencoderKLWan, clips: torch.Tensor) -> tuple[list, list]:
    """Per-channel mean and std of the latent means of `clips` (what Wan's config stores)."""
    z = vae.encode(clips).latent_dist.mode()
    return z.mean((0, 2, 3, 4)).tolist(), z.std((0, 2, 3, 4)).clamp_min(1e-3).tolist()


def load_demo_vae(path: str | Path = ASSET_DIR) -> AutoencoderKLWan:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"demo VAE not found at {path}; rebuild it with "
                                f"`python -m policy.demo_vae --out {path}`")
    from policy.models import own_storage

    return own_storage(AutoencoderKLWan.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True)).eval()


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ASSET_DIR))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae = train_demo_vae(args.steps, seed=args.seed)
    vae.save_pretrained(args.out)
    print(f"[demo_vae] wrote {args.out}")


if __name__ == "__main__":
    main()
