"""The demo's trained tiny VAE (policy/demo_vae.py) and `make demo` end to end (launcher/demo.py)."""

import re

import pytest
import torch

from policy.demo_vae import ASSET_DIR, DemoClips, latent_stats, load_demo_vae, train_demo_vae
from policy.models import build_tiny_vae
from policy.policy import denormalize_latents, normalize_latents


@pytest.fixture(scope="module")
def clips():
    return DemoClips(num_frames=9, height=32, width=32, seed=123).batch(4)  # not the training stream (seed 0)


def reconstruction_mse(vae, clips) -> float:
    with torch.no_grad():
        return (vae.decode(vae.encode(clips).latent_dist.mode()).sample - clips).pow(2).mean().item()


def brightness_gradient(vae, clips) -> float:
    """|d mean decoded intensity / d latents| (L2, in the policy's normalised latent space), per clip."""
    with torch.no_grad():
        z = normalize_latents(vae, vae.encode(clips).latent_dist.mode())
    z.requires_grad_(True)
    video = vae.decode(denormalize_latents(vae, z)).sample
    (grad,) = torch.autograd.grad(video.mean((1, 2, 3, 4)).sum(), z)
    return grad.flatten(1).norm(dim=1).mean().item()


def test_shipped_demo_vae_reconstructs_and_passes_brightness(clips):
    """What the demo needs of it: pixels follow the latents. The random tiny VAE fails both."""
    trained, random = load_demo_vae(), build_tiny_vae(0)
    assert len(trained.config.latents_mean) == len(trained.config.latents_std) == trained.config.z_dim
    assert reconstruction_mse(trained, clips) < 0.5 * reconstruction_mse(random, clips)
    assert brightness_gradient(trained, clips) > 20 * brightness_gradient(random, clips)


def test_train_demo_vae_records_latent_statistics():
    """Its config's latents_mean/std normalise demo-clip latents (as Wan's do real videos)."""
    vae = train_demo_vae(steps=1, batch_size=1, log_every=None)
    with torch.no_grad():
        z = normalize_latents(vae, vae.encode(DemoClips(9, 32, 32, seed=7).batch(16)).latent_dist.mode())
    raw_mean, _ = latent_stats(vae, DemoClips(9, 32, 32, seed=7).batch(16))
    assert max(abs(m) for m in raw_mean) > 0.05  # the raw latents are not normalised already
    assert z.mean((0, 2, 3, 4)).abs().max() < 0.5
    assert 0.5 < z.std((0, 2, 3, 4)).min() and z.std((0, 2, 3, 4)).max() < 2.0


def test_missing_demo_vae_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"demo VAE not found at .*nowhere.*python -m policy.demo_vae"):
        load_demo_vae(tmp_path / "nowhere")


def test_asset_dir_is_in_the_package():
    assert (ASSET_DIR / "config.json").is_file() and any(ASSET_DIR.glob("*.safetensors"))


@pytest.mark.slow
def test_make_demo_raises_the_mean_reward(root, tmp_path, capsys):
    """`python -m launcher.demo` on a fresh directory: builds shards and the demo model, trains, reports,
    and the final LoRA loads into WanVACEPipeline; the demo reward rises (seeded, so deterministic)."""
    from launcher.demo import main
    from runtime.metrics import read_metrics

    out, data, model = tmp_path / "demo", tmp_path / "data", tmp_path / "model"
    main(["--config", str(root / "cluster_configs" / "demo_cpu.yaml"), "trainer.steps=60",
          "trainer.checkpoint_every=60", "logging.video_every=0", "logging.progress_bar=false",
          f"trainer.output_dir={out}", f"model.path={model}",
          f"data.prompt_shards={data}/prompts-{{000000..000001}}.tar",
          f"data.preference_shards={data}/pairs-{{000000..000001}}.tar"])
    printed = capsys.readouterr().out
    assert (model / "model_index.json").is_file() and (data / "prompts-000000.tar").is_file()
    assert "load_lora_weights" in printed and "-> video (9, 32, 32, 3)" in printed
    # the stock pipeline, at the training's text length, shows what the LoRA learned: a brighter video
    match = re.search(r"base ([0-9.]+), with the LoRA ([0-9.]+)", printed)
    assert match and float(match.group(2)) > float(match.group(1)) + 0.01, printed[-500:]
    assert (out / "checkpoints" / "step_000060" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    rewards = [r["reward_mean"] for r in read_metrics(out)]
    assert len(rewards) == 60
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.03, rewards
