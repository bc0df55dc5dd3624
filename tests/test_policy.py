"""Policies, sampler and LoRA against diffusers' own pipelines, and the GRPO invariants."""

import numpy as np
import pytest
import torch
from PIL import Image

from config import load_config
from policy.grpo import grpo_loss
from policy.lora import lora_state_dict, save_lora
from policy.models import build_components, pipeline_for, save_pretrained
from policy.policy import WanPolicy
from policy.sampler import initial_noise, sample_group, score_step
from policy.schedule import sampling_schedule
from policy.sde import NoiseRule, sde_step_with_logprob

PROMPT = "two people talk in a sunny park"
EULER_2, EULER_3 = sampling_schedule("euler", 2, 3.0), sampling_schedule("euler", 3, 3.0)  # local_cpu: euler


def make_policy(root, kind, *overrides):
    cfg = load_config(root / "cluster_configs" / "local_cpu.yaml", [f"model.kind={kind}", *overrides])
    return WanPolicy(build_components(cfg.model), cfg.model, cfg.sampler), cfg


def refs(n=2):
    rng = np.random.RandomState(0)
    return [rng.randint(0, 255, (40, 28, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("kind,guidance", [("t2v", 4.5), ("vace", 4.5), ("t2v", 1.0), ("vace", 1.0)])
def test_zero_noise_trajectory_equals_diffusers_pipeline(root, kind, guidance):
    """With CFG, and without (guidance 1: one pass per step here, and in diffusers' pipeline, which skips the
    unconditional pass at a guidance scale of 1): the stock pipeline reproduces the policy's deterministic sample."""
    policy, cfg = make_policy(root, kind, f"sampler.guidance_scale={guidance}")
    references = refs() if kind == "vace" else []
    cond = policy.encode_condition(PROMPT, references)
    noise, _ = initial_noise([7], cond.latent_shape)
    euler = sampling_schedule("euler", cfg.sampler.num_steps, cfg.sampler.shift)  # the pipeline's scheduler
    ours = sample_group(policy, cond, [7], NoiseRule(), euler, deterministic=True, decode=False, latents=noise)
    pipe = pipeline_for(policy.components)
    kwargs = dict(prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=cond.negative_embeds,
                  latents=noise.clone(), num_inference_steps=cfg.sampler.num_steps,
                  guidance_scale=cfg.sampler.guidance_scale, height=cfg.model.height, width=cfg.model.width,
                  num_frames=cfg.model.num_frames, output_type="latent")
    if kind == "vace":
        kwargs["reference_images"] = [Image.fromarray(r) for r in references]
    theirs = pipe(**kwargs).frames
    torch.testing.assert_close(ours.final_latents, theirs, rtol=1e-4, atol=1e-4)
    assert ours.log_probs is None


CFG_FREE = {"t2v": ["sampler.guidance_scale=1"], "vace": ["sampler.guidance_scale=1"],
            "phantom": ["sampler.guidance_scale=1", "sampler.image_guidance_scale=1"]}


@pytest.mark.parametrize("kind", ["t2v", "vace", "phantom"])
def test_cfg_free_velocity_is_one_conditional_pass_and_its_log_probs_the_closed_form(root, kind):
    """Guidance 1 (Phantom: text and image): no negative prompt encoded, one transformer pass of the batch per
    velocity, equal bit for bit to the conditional pass called by hand; each recorded log-prob is the Gaussian
    log-density of the next latent around the SDE mean of that velocity, and the first ratio is exactly 1."""
    policy, cfg = make_policy(root, kind, *CFG_FREE[kind])
    cond = policy.encode_condition(PROMPT, refs() if kind != "t2v" else [])
    assert policy.passes_per_step == 1 and cond.negative_embeds is None
    traj = sample_group(policy, cond, [1, 2], NoiseRule.from_config(cfg.sampler), EULER_3)
    rows = []
    hook = policy.transformer.register_forward_hook(lambda m, args, kw, out: rows.append(kw["hidden_states"].shape[0]),
                                                    with_kwargs=True)
    try:
        x, t = traj.latents[:, 1], traj.timesteps[1].expand(2)
        v = policy.velocity(x, t, cond)
    finally:
        hook.remove()
    assert rows == [2]  # one pass: the two samples, not four rows
    kwargs, hidden = {}, x
    if kind == "vace":
        kwargs["control_hidden_states"] = cond.control.expand(2, -1, -1, -1, -1)
    if kind == "phantom":
        hidden = torch.cat([x, cond.ref_latents.expand(2, -1, -1, -1, -1)], dim=2)
    with torch.no_grad():
        by_hand = policy.transformer(hidden_states=hidden, timestep=t, encoder_hidden_states=cond.prompt_embeds.expand(
            2, -1, -1), **kwargs).sample[:, :, : x.shape[2]].float()
    assert torch.equal(v, by_hand)
    s, s_next = traj.sigmas[1], traj.sigmas[2]
    step = sde_step_with_logprob(x, by_hand, s, s_next, traj.rule, prev_sample=traj.latents[:, 2])
    normal = torch.distributions.Normal(step.mean, step.scale.view(-1, 1, 1, 1, 1))
    density = normal.log_prob(traj.latents[:, 2].double()).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(traj.log_probs[:, 1], density, rtol=0, atol=1e-10)
    for k in range(3):
        assert torch.equal(score_step(policy, traj, k).log_prob.detach(), traj.log_probs[:, k])


def test_decode_matches_pipeline_video(root):
    policy, cfg = make_policy(root, "t2v")
    cond = policy.encode_condition(PROMPT)
    traj = sample_group(policy, cond, [1], NoiseRule(), EULER_2, deterministic=True)
    pipe = pipeline_for(policy.components)
    video = pipe(prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=cond.negative_embeds,
                 latents=traj.latents[:, 0].clone(), num_inference_steps=2, height=32, width=32, num_frames=9,
                 guidance_scale=cfg.sampler.guidance_scale, output_type="np").frames  # float in [0, 1]
    assert traj.videos.shape == (1, 9, 32, 32, 3) and traj.videos.dtype == torch.uint8
    assert np.abs(traj.videos.numpy() / 255.0 - video).max() <= 1.0 / 255 + 1e-4


@pytest.mark.parametrize("kind", ["t2v", "vace", "phantom"])
def test_first_update_ratio_is_exactly_one(root, kind):
    policy, cfg = make_policy(root, kind)
    cond = policy.encode_condition(PROMPT, refs() if kind != "t2v" else [])
    traj = sample_group(policy, cond, [1, 2, 3], NoiseRule.from_config(cfg.sampler), EULER_3)
    assert traj.log_probs.shape == (3, 3) and traj.videos.shape == (3, 9, 32, 32, 3)
    for k in range(3):
        score = score_step(policy, traj, k)
        assert torch.equal(score.log_prob.detach(), traj.log_probs[:, k])
        assert torch.equal(torch.exp(score.log_prob - traj.log_probs[:, k]), torch.ones(3, dtype=torch.float64))


def test_seeds_reproduce_and_members_differ(root):
    policy, cfg = make_policy(root, "vace")
    cond = policy.encode_condition(PROMPT, refs(1))
    rule = NoiseRule.from_config(cfg.sampler)
    a = sample_group(policy, cond, [5, 6], rule, EULER_3, decode=False)
    b = sample_group(policy, cond, [5, 6], rule, EULER_3, decode=False)
    c = sample_group(policy, cond, [6], rule, EULER_3, decode=False)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents[0, 0], a.latents[1, 0])
    assert not torch.equal(a.latents[0, 2], a.latents[1, 2])
    torch.testing.assert_close(c.latents[0], a.latents[1], rtol=1e-5, atol=1e-5)  # batch-independent
    shared = sample_group(policy, cond, [5, 6], rule, EULER_3, decode=False, shared_initial_noise=True)
    assert torch.equal(shared.latents[1, 0], a.latents[0, 0])  # one start: the first member's noise
    assert torch.equal(shared.latents[0], a.latents[0])  # the first member is the same video
    assert not torch.equal(shared.latents[0, 1], shared.latents[1, 1])  # the step noise still differs
    b1 = sample_group(policy, cond, [6], rule, EULER_3, decode=False, latents=a.latents[:1, 0])
    torch.testing.assert_close(shared.latents[1], b1.latents[0], rtol=1e-5, atol=1e-5)  # member 2's own step noise


def _sgd(policy, traj, advantage, steps=3, lr=0.05):
    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    adv = torch.full((traj.latents.shape[0],), float(advantage))
    for _ in range(steps):
        opt.zero_grad()
        score = score_step(policy, traj, 1)
        loss, _ = grpo_loss(score.log_prob, traj.log_probs[:, 1], adv, clip_range=1e6)
        loss.backward()
        opt.step()
    return score_step(policy, traj, 1).log_prob.detach()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_advantage_sign_moves_log_prob(root, sign):
    policy, cfg = make_policy(root, "vace", "model.lora.rank=8")
    cond = policy.encode_condition(PROMPT, refs(1))
    traj = sample_group(policy, cond, [1, 2], NoiseRule.from_config(cfg.sampler), EULER_3, decode=False)
    after = _sgd(policy, traj, sign)
    delta = after - traj.log_probs[:, 1]
    assert (sign * delta > 0).all(), delta


def test_kl_zero_at_init_positive_after_update(root):
    policy, cfg = make_policy(root, "vace")
    cond = policy.encode_condition(PROMPT, refs(1))
    traj = sample_group(policy, cond, [1, 2], NoiseRule.from_config(cfg.sampler), EULER_3, decode=False)
    assert torch.equal(score_step(policy, traj, 1, with_kl=True).kl, torch.zeros(2, dtype=torch.float64))
    _sgd(policy, traj, 1.0)
    assert (score_step(policy, traj, 1, with_kl=True).kl > 0).all()


def test_full_finetune_reference_is_frozen_copy(root):
    policy, cfg = make_policy(root, "t2v", "model.lora.enabled=false")
    assert policy.reference_transformer is not None
    assert all(p.requires_grad for p in policy.transformer.parameters())
    cond = policy.encode_condition(PROMPT)
    traj = sample_group(policy, cond, [1, 2], NoiseRule.from_config(cfg.sampler), EULER_3, decode=False)
    assert torch.equal(score_step(policy, traj, 1, with_kl=True).kl, torch.zeros(2, dtype=torch.float64))
    _sgd(policy, traj, 1.0, lr=0.01)
    assert (score_step(policy, traj, 1, with_kl=True).kl > 0).all()


@pytest.mark.parametrize("kind,alpha", [("t2v", 4.0), ("vace", 4.0), ("vace", 32.0)])
def test_lora_file_loads_into_diffusers_pipeline(root, tmp_path, kind, alpha):
    """Alpha 32 with rank 4 (the demo's): the scale must travel in the file, not be assumed = rank."""
    policy, cfg = make_policy(root, kind, f"model.lora.alpha={alpha}")
    cond = policy.encode_condition(PROMPT, refs(1) if kind == "vace" else [])
    traj = sample_group(policy, cond, [1, 2], NoiseRule.from_config(cfg.sampler), EULER_3, decode=False)
    _sgd(policy, traj, 1.0)
    lora_path = save_lora(policy.transformer, tmp_path / "lora", kind)
    assert lora_path.is_file() and len(lora_state_dict(policy.transformer)) > 0

    base_policy, _ = make_policy(root, kind)  # same tiny seed: the untouched base weights
    save_pretrained(base_policy.components, tmp_path / "base")
    from diffusers import WanPipeline, WanVACEPipeline

    pipe = (WanVACEPipeline if kind == "vace" else WanPipeline).from_pretrained(tmp_path / "base")
    x, sigma = traj.latents[:, 1], traj.sigmas[1].expand(2)
    kwargs = {} if cond.control is None else {"control_hidden_states": cond.control.expand(2, -1, -1, -1, -1)}

    def pipe_out():
        with torch.no_grad():
            return pipe.transformer(hidden_states=x, timestep=(sigma * 1000).float(),
                                    encoder_hidden_states=cond.prompt_embeds.expand(2, -1, -1), **kwargs).sample

    before = pipe_out()
    pipe.load_lora_weights(tmp_path / "lora")
    after = pipe_out()
    with torch.no_grad():
        trained = policy.transformer(hidden_states=x, timestep=(sigma * 1000).float(),
                                     encoder_hidden_states=cond.prompt_embeds.expand(2, -1, -1), **kwargs).sample
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, trained, rtol=1e-5, atol=1e-5)


def test_phantom_guidance_terms(root):
    """With w_img = w_text = 1 the Phantom CFG is the fully conditioned prediction alone."""
    policy, cfg = make_policy(root, "phantom", "sampler.guidance_scale=1.0", "sampler.image_guidance_scale=1.0")
    cond = policy.encode_condition(PROMPT, refs(2))
    assert cond.ref_latents.shape == (1, 16, 2, 4, 4) and cond.latent_shape == (16, 3, 4, 4)
    x = torch.randn(2, *cond.latent_shape)
    v = policy.velocity(x, torch.tensor([700.0, 700.0]), cond)
    with torch.no_grad():
        full = policy.transformer(hidden_states=torch.cat([x, cond.ref_latents.expand(2, -1, -1, -1, -1)], 2),
                                  timestep=torch.full((2,), 700.0),
                                  encoder_hidden_states=cond.prompt_embeds.expand(2, -1, -1)).sample
    torch.testing.assert_close(v, full[:, :, :3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reference image"):
        policy.encode_condition(PROMPT, [])



def test_more_references_than_latent_frames(root):
    """4 people in a 9-frame clip (3 latent frames): diffusers 0.42's prepare_masks pads the mask short here;
    ours gives the K reference frames zero mask channels and the video frames diffusers' own mask."""
    policy, cfg = make_policy(root, "vace", "model.max_references=4")
    few, many = policy.encode_condition(PROMPT, refs(2)), policy.encode_condition(PROMPT, refs(4))
    z, frames, h, w = few.latent_shape
    assert many.latent_shape == (z, frames - 2 + 4, h, w) and many.num_ref_frames == 4
    assert many.control.shape[2] == frames - 2 + 4
    latent_channels = 2 * z
    assert many.control[:, latent_channels:, :4].abs().sum() == 0  # reference frames: mask 0
    # the video frames' mask channels are the same whatever the number of references
    torch.testing.assert_close(many.control[:, latent_channels:, 4:], few.control[:, latent_channels:, 2:])


def test_decoding_one_video_at_a_time_equals_the_batch(root):
    one, cfg = make_policy(root, "t2v", "model.vae_decode_batch=1")
    cond = one.encode_condition(PROMPT)
    latents = torch.randn(3, *cond.latent_shape, generator=torch.Generator().manual_seed(0))
    batched, _ = make_policy(root, "t2v", "model.vae_decode_batch=3")
    a, b = one.decode(latents, cond).int(), batched.decode(latents, cond).int()
    # the same up to float rounding in the batched convolutions: a rare pixel 1/255 apart
    assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 1e-3


def test_transformer_sees_the_schedules_timesteps(root):
    """UniPC (official): the transformer gets the scheduler's integer timesteps (999, 857, 600), not sigma * 1000;
    the score step at k recomputes with the same timestep."""
    policy, cfg = make_policy(root, "t2v")
    cond = policy.encode_condition(PROMPT)
    seen = []
    hook = policy.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"].tolist()), with_kwargs=True)
    try:
        unipc = sampling_schedule("unipc", 3, 3.0)
        traj = sample_group(policy, cond, [1], NoiseRule("linear", std_min="schedule", std_max="schedule"), unipc,
                            decode=False)
        score_step(policy, traj, 2)
    finally:
        hook.remove()
    assert unipc.timesteps.tolist() == [999.0, 857.0, 600.0]
    assert seen == [[t, t] for t in unipc.timesteps.tolist()] + [[600.0, 600.0]]  # cond + uncond rows
    assert traj.rule.std_max == unipc.sigmas[1].item() and traj.rule.std_min == 0.0  # resolved and stored
