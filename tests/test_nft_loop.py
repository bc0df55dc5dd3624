"""The NFT objective (grpo.objective=nft, policy/nft.py) through the whole loop on CPU: Ray, two DeepSpeed ranks,
deterministic DPM-Solver++(2M) rollouts, two inner epochs (so the sampling policy's velocities come from the
pass before the first optimizer step), exact resume, and the trained LoRA in the stock diffusers pipeline."""

import pytest
import torch

from config import load_config
from tests.test_loop import TIMING, config, ray_cluster, run, shards  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

NFT = ["trainer.steps=3", "trainer.checkpoint_every=2", "grpo.objective=nft", "sampler.guidance_scale=1",
       "sampler.ode_solver=dpm2m", "sampler.ode_steps_ratio=0.5", "grpo.num_inner_epochs=2", "grpo.kl_beta=0.0001",
       "grpo.std_mode=global", "grpo.timestep_fraction=0.7", "logging.video_every=0"]


def test_nft_trains_resumes_exactly_and_its_lora_loads_in_diffusers(root, shards, tmp_path):  # noqa: F811
    from diffusers import WanVACEPipeline

    from policy.models import build_components

    whole_dir, resumed_dir = tmp_path / "whole", tmp_path / "resumed"
    whole = run(config(root, shards, whole_dir, *NFT))
    for r in whole:
        # deterministic rollouts on 2 of the 3 grid steps (ceil(3 * 0.5)), one pass each; 2 of 3 levels trained
        # (int(3 * 0.7)) per epoch, each a forward + backward, the reference's and the sampling policy's forward
        assert r["rollout_nfe"] == 2 and r["learn_passes"] == 2 * 2 * 3, r
        assert "ratio_mean" not in r and r["old_deviation"] > 0 and r["kl"] > 0 and torch.isfinite(
            torch.tensor(r["loss"])), r
    resumed = run(config(root, shards, resumed_dir, *NFT,
                         f"trainer.resume={whole_dir / 'checkpoints' / 'step_000002'}"))
    assert [r["step"] for r in resumed] == [3]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in whole[2:]]

    cfg = load_config(root / "cluster_configs" / "local_cpu.yaml", ["trainer.output_dir=x"])
    parts = build_components(cfg.model, cfg.sampler.shift)
    pipe = WanVACEPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae,
                           transformer=parts.transformer, scheduler=parts.scheduler)
    x = torch.randn(1, pipe.transformer.config.in_channels, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = {"hidden_states": x, "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 4, pipe.transformer.config.text_dim),
              "control_hidden_states": torch.randn(1, pipe.transformer.config.vace_in_channels, 3, 8, 8)}
    with torch.no_grad():
        base = pipe.transformer(**inputs).sample
        pipe.load_lora_weights(str(whole_dir / "checkpoints" / "step_000003" / "lora"))
        trained = pipe.transformer(**inputs).sample
    assert not torch.equal(base, trained)  # the adapters loaded, and training moved them
