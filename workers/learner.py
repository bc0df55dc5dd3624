"""Learner worker: one rank of a DeepSpeed ZeRO engine group that applies GRPO updates.

The ranks form one torch.distributed group (gloo on CPU, NCCL on GPU); rank 0 publishes the
rendezvous address. Each rank trains on its share of the prompt groups. One micro-step is one chunk of a
group's rows at one sampled timestep: the rows of one of the rollout's transformer forwards, which the
trajectory records (policy/sampler.py `forward_chunks`), so the first recomputed log-prob matches the
rollout's bit for bit whatever kernels the hardware picks for those shapes. DeepSpeed accumulates the
micro-steps of an update (`gradient_accumulation_steps` = groups per rank x trained timesteps x chunks per
group / `grpo.optimizer_steps_per_update`) and steps the optimizer at each boundary, after all-reducing
gradients across ranks and clipping them: once per update, or, as the official recipe, twice (the second
half of the groups then trains off-policy by one step, which is what the clipped ratio is for).

With context parallelism (`model.context_parallel`, policy/context_parallel.py) each video's sequence is split
across `degree` consecutive ranks: they form a context group, get the same prompt groups, and each computes its tokens'
share of the gradient. DeepSpeed's world stays every rank, so ZeRO shards over data-parallel and context ranks alike
(torchtitan's dp_shard_cp) and its all-reduce sums the shares (the loss is scaled by the degree to turn its average
over all ranks into the mean over the data-parallel shares).

A collective group cannot lose a member, so the driver gang-restarts this whole group from the last
checkpoint when any rank dies (launcher/train.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import ray
import torch

from config.checks import data_parallel_size
from policy.context_parallel import ContextDegrees, context_mesh, parallelize_policy
from policy.ema import Ema
from policy.grpo import grpo_loss, select_timesteps
from policy.lora import save_lora
from policy.models import TRANSFORMER_ONLY, build_components
from policy.nft import nft_loss, noised
from policy.policy import WanPolicy
from policy.sampler import score_step
from policy.schedule import schedule_from_config
from policy.sde import host_to_device
from runtime.cpu_bf16 import bf16_matmuls_in_fp32
from workers.common import WorkerBase, maybe_fault, published_weights, sample_seed
from workers.update_plan import micro_steps_per_optimizer_step, nft_needs_old_pass, recorded_chunks
from workers.weight_sync import WeightGroupMember, sync_tensors

ENGINE_TAG = "engine"
EMA_FILE = "ema.pt"
# grpo_loss stats summed over micro-steps (the driver divides by the micro-step count); ratio_mean and
# clip_frac are summed weighted by the trained elements (the driver divides by their total), so fully
# masked groups do not pull them to 1 and 0; ratio_min and ratio_max are reduced by min and max.
SUMMED_STATS = ("policy_loss", "kl", "loss", "num_trained")
NFT_SUMMED_STATS = ("policy_loss", "kl", "loss", "num_trained", "old_deviation")
NFT_NOISE_DOMAIN = 0x4E_4654  # keeps the NFT objective's training noise apart from every rollout seed stream
TRAINED_WEIGHTED_STATS = ("ratio_mean", "clip_frac")


def deepspeed_config(cfg, grad_accum: int) -> dict:
    """The engine keeps the dtypes the policy set (policy/precision.py): LoRA trains its fp32 adapters on
    DeepSpeed's fp32 path (the bf16 frozen base is not the engine's business), so mixed precision is
    turned on only for full fine-tuning in bf16, with fp32 gradient accumulation."""
    engine = cfg.workers.learner_engine
    mixed = engine.precision == "bf16" and not cfg.model.lora.enabled
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(cfg.optim.grad_clip),
        # memory_efficient_linear off: at stage 3 DeepSpeed otherwise replaces torch.nn.functional.linear
        # process-wide with its own (matmul, then a separate bias add), whose bf16 rounding differs from the
        # rollout's fused linear: the first importance ratio came out 0.998-1.001 instead of exactly 1.
        "zero_optimization": {"stage": int(engine.zero_stage), "memory_efficient_linear": False},
        "bf16": {"enabled": mixed},
        # torch_adam: the plain torch AdamW, so no fused op is compiled (see ../shared/CPU_STACK.md).
        "optimizer": {"type": "AdamW", "params": {
            "lr": float(cfg.optim.lr), "betas": list(cfg.optim.betas),
            "weight_decay": float(cfg.optim.weight_decay), "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if mixed:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if cfg.optim.warmup_steps > 0:  # linear warm-up from 0, then constant; no scheduler = constant lr
        config["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": float(cfg.optim.lr),
            "warmup_num_steps": int(cfg.optim.warmup_steps), "warmup_type": "linear"}}
    return config


class _StateTensors(torch.nn.Module):
    """The tensors of an optimizer's state, as a module's buffers, so `tensor_bytes` counts them."""

    def __init__(self, state):
        super().__init__()
        tensors = [t for per_param in state.values() if isinstance(per_param, dict) for t in per_param.values()
                   if torch.is_tensor(t)]
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t, persistent=False)


class LearnerWorker(WeightGroupMember, WorkerBase):
    def __init__(self, rank: int, world_size: int, cfg_yaml: str):
        super().__init__(rank, world_size, cfg_yaml)
        self.engine = None
        self.policy: Optional[WanPolicy] = None
        self.ema: Optional[Ema] = None
        # Context parallelism (policy/context_parallel.py): consecutive ranks split each video's sequence between
        # them (context_mesh's layout) and train on the same share of the prompt groups; the driver sends them the
        # same groups and reads the stats of each group's first rank.
        self.context = ContextDegrees.from_config(self.cfg.model)
        self.data_parallel_size = data_parallel_size(self.cfg)

    # ------------------------------------------------------------------ setup

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group and build the engine; returns the number of trainable parameters."""
        import deepspeed

        from runtime.distributed import init_distributed

        cfg = self.cfg
        maybe_fault(cfg, "learner", self.rank, 0)  # "learner:R:0": rank R dies while the group starts
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          LOCAL_RANK="0" if cfg.trainer.device == "cpu" else str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_WORLD_SIZE=str(self.world_size))
        if cfg.trainer.device.startswith("cuda"):
            os.environ["LOCAL_RANK"] = "0"  # Ray gives each actor its own visible GPU
        init_distributed("gloo" if cfg.trainer.device == "cpu" else "nccl")
        torch.manual_seed(cfg.trainer.seed)
        # Only the transformer: prompt embeddings and conditioning latents come with the trajectories.
        self.policy = WanPolicy(build_components(cfg.model, cfg.sampler.shift, parts=TRANSFORMER_ONLY), cfg.model,
                                cfg.sampler, device=cfg.trainer.device)
        if self.context.enabled:  # before DeepSpeed wraps (and, at ZeRO-3, partitions) the transformer
            mesh = context_mesh(self.context, torch.device(cfg.trainer.device).type)
            parallelize_policy(self.policy, self.context, mesh)
        params = [p for p in self.policy.transformer.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.policy.transformer, model_parameters=params,
            config=deepspeed_config(cfg, micro_steps_per_optimizer_step(cfg, self.data_parallel_size)))
        self.policy.transformer = self.engine.module
        self.schedule = schedule_from_config(cfg.sampler)  # the NFT objective trains at its grid's levels
        ema = cfg.optim.ema
        if ema.enabled:  # after deepspeed.initialize: the parameters it trains (ZeRO <= 2: whole on every rank)
            self.ema = Ema(self._trainable(), ema.decay, ema.update_interval, ema.repeats)
        return sum(p.numel() for p in params)

    def _trainable(self):
        return [(name, p) for name, p in self.engine.module.named_parameters() if p.requires_grad]

    def memory_modules(self) -> Dict[str, object]:
        optimizer = getattr(self.engine, "optimizer", None)
        state = getattr(optimizer, "state", None) or {}
        return {"transformer": self.policy.transformer, "reference": self.policy.reference_transformer,
                "optimizer_state": _StateTensors(state)}

    def policy_dtypes(self) -> Dict[str, str]:
        """{parameter: dtype} of the transformer it recomputes log-probs with (must equal the rollout's)."""
        from policy.precision import dtype_map

        return dtype_map(self.engine.module)

    def shutdown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------ training

    def update(self, step: int, group_ids: List[int], advantages: List[torch.Tensor], masks: List[torch.Tensor],
               *trajectories) -> Dict[str, float]:
        """GRPO update on this rank's groups; returns summed stats (the driver averages over ranks)."""
        # bf16 on an AVX2-only CPU (rehearsals): linear and conv3d layers in float32, as the rollout's sampling
        # (runtime/cpu_bf16.py); only for the update, so F.linear is torch's outside it
        with bf16_matmuls_in_fp32(self.cfg.trainer.device, self.cfg.model.dtype):
            return self._update(step, group_ids, advantages, masks, *trajectories)

    def _update(self, step: int, group_ids: List[int], advantages: List[torch.Tensor], masks: List[torch.Tensor],
                *trajectories) -> Dict[str, float]:
        maybe_fault(self.cfg, "learner", self.rank, step)
        self.engine.train()
        start = time.perf_counter()
        if self.cfg.grpo.objective == "nft":
            out = self._nft_update(step, group_ids, advantages, masks, trajectories)
        else:
            out = self._grpo_update(step, group_ids, advantages, masks, trajectories)
        out.update(learn_s=time.perf_counter() - start, lr=float(self.engine.get_lr()[0]),
                   grad_norm=float(self.engine.get_global_grad_norm() or 0.0))
        return out

    def _grpo_update(self, step: int, group_ids, advantages, masks, trajectories) -> Dict[str, float]:
        cfg = self.cfg
        sums: Dict[str, torch.Tensor] = {}
        lows, highs, deviations = [], [], []  # stats stay tensors until the end: no per-micro-step sync
        # Micro-steps before this update's first optimizer step: their recomputed log-probs must equal the
        # rollout's exactly (first_epoch_logprob_dev); after it the policy has moved.
        on_policy = micro_steps_per_optimizer_step(cfg, self.data_parallel_size)
        # each group's rollout values on the device once per update (not one blocking copy per micro-step)
        device = self.policy.device
        groups = [(gid, host_to_device(adv, device), host_to_device(mask, device),
                   host_to_device(traj.log_probs, device), traj)
                  for gid, adv, mask, traj in zip(group_ids, advantages, masks, trajectories)]
        for epoch in range(cfg.grpo.num_inner_epochs):
            for gid, adv, mask, old_log_probs, traj in groups:
                gen = torch.Generator().manual_seed(sample_seed(cfg.trainer.seed, step, gid, 10_000 + epoch))
                trainable = traj.trainable_steps  # every step, or the SDE window's (ODE steps have no log-prob)
                timesteps = [trainable[i] for i in select_timesteps(len(trainable), cfg.grpo.timestep_fraction,
                                                                    cfg.grpo.timestep_order, gen).tolist()]
                for k, rows in ((k, rows) for k in timesteps for rows in recorded_chunks(cfg, traj)):
                    score = score_step(self.policy, traj, k, rows=rows, with_kl=cfg.grpo.kl_beta > 0)
                    rows_ = slice(rows[0], rows[-1] + 1)  # row_chunks are contiguous: a slice, no index copy
                    loss, stats = grpo_loss(score.log_prob, old_log_probs[rows_, k], adv[rows_], cfg.grpo.clip_range,
                                            kl=score.kl, kl_beta=cfg.grpo.kl_beta, mask=mask[rows_])
                    self._micro_step(loss)
                    if epoch == 0 and len(lows) < on_policy:
                        deviations.append((score.log_prob.detach() - old_log_probs[rows_, k]).abs().max())
                    for name in SUMMED_STATS:
                        sums[name] = sums.get(name, 0.0) + stats[name]
                    for name in TRAINED_WEIGHTED_STATS:
                        sums[name] = sums.get(name, 0.0) + stats[name] * stats["num_trained"]
                    lows.append(stats["ratio_min"])
                    highs.append(stats["ratio_max"])
        out = {name: float(value) for name, value in sums.items()}
        low = float(torch.stack(lows).min()) if lows else float("inf")
        high = float(torch.stack(highs).max()) if highs else float("-inf")
        out.update(micro_steps=len(lows), ratio_min=low, ratio_max=high,  # +-inf: nothing trained here
                   first_epoch_logprob_dev=float(torch.stack(deviations).max()) if deviations else 0.0)
        return out

    def _nft_update(self, step: int, group_ids, advantages, masks, trajectories) -> Dict[str, float]:
        """DiffusionNFT's update (policy/nft.py): per micro-step, a group's row chunk at one grid step of the
        sampler's schedule, its final latents noised afresh (each row's noise from its own seed, so a replay is
        exact). The sampling policy's velocity is the current one, detached, while no optimizer step has been
        taken in this update; when the update spans several, it is computed first, for every micro-step, before
        any (one more forward each, counted in learn_passes)."""
        cfg = self.cfg
        plan = []
        for epoch in range(cfg.grpo.num_inner_epochs):
            for index, (gid, traj) in enumerate(zip(group_ids, trajectories)):
                if traj.guidance_scale != float(cfg.sampler.guidance_scale):  # v_old would not be the sampler's
                    raise ValueError(f"sampler.guidance_scale {cfg.sampler.guidance_scale} differs from the rollout's "
                                     f"{traj.guidance_scale} (trajectory {traj.key!r})")
                gen = torch.Generator().manual_seed(sample_seed(cfg.trainer.seed, step, gid, 10_000 + epoch))
                for k in select_timesteps(self.schedule.num_steps, cfg.grpo.timestep_fraction,
                                          cfg.grpo.timestep_order, gen).tolist():
                    plan += [(index, epoch, k, rows) for rows in recorded_chunks(cfg, traj)]
        old = None
        if nft_needs_old_pass(cfg):
            with torch.no_grad():
                old = [self._nft_forward(trajectories[i], rows, k, epoch)[2] for i, epoch, k, rows in plan]
        sums: Dict[str, torch.Tensor] = {}
        for n, (index, epoch, k, rows) in enumerate(plan):
            traj, rows_ = trajectories[index], slice(rows[0], rows[-1] + 1)
            x0, x_t, velocity, reference = self._nft_forward(traj, rows, k, epoch, with_reference=cfg.grpo.kl_beta > 0)
            old_velocity = velocity.detach() if old is None else old[n]
            loss, stats = nft_loss(velocity, old_velocity, x_t, x0, self.schedule.sigmas[k], advantages[index][rows_],
                                   cfg.grpo.nft_beta, cfg.grpo.adv_clip, ref_velocity=reference,
                                   kl_beta=cfg.grpo.kl_beta, mask=masks[index][rows_])
            self._micro_step(loss)
            for name in NFT_SUMMED_STATS:
                sums[name] = sums.get(name, 0.0) + stats[name]
        out = {name: float(value) for name, value in sums.items()}
        out.update(micro_steps=len(plan))
        return out

    def _nft_forward(self, traj, rows: List[int], k: int, epoch: int, with_reference: bool = False):
        """(x0, x_t, velocity, reference velocity or None) for rows of `traj` at grid step k of the schedule."""
        device = self.policy.device
        x0 = host_to_device(traj.final_latents[rows[0]:rows[-1] + 1], device).float()
        noise = torch.stack([torch.randn(x0.shape[1:], dtype=torch.float32, generator=torch.Generator().manual_seed(
            sample_seed(traj.seeds[i], NFT_NOISE_DOMAIN, epoch, k))) for i in rows])
        x_t = noised(x0, host_to_device(noise, device), float(self.schedule.sigmas[k]))
        timestep = self.schedule.timesteps[k].expand(len(rows))
        cond = traj.cond.to(device)
        velocity = self.policy.velocity(x_t, timestep, cond)
        reference = None
        if with_reference:
            with torch.no_grad():
                reference = self.policy.velocity(x_t, timestep, cond, reference=True)
        return x0, x_t, velocity, reference

    def _micro_step(self, loss: torch.Tensor) -> None:
        """Backward and DeepSpeed's step (the optimizer steps at each accumulation boundary), then the EMA."""
        engine = self.engine
        # DeepSpeed averages gradients over all ranks; a context group's ranks each hold their tokens' share of one
        # gradient, which must be summed: times the degree, the average over all ranks is the data-parallel mean.
        engine.backward(loss * self.context.size if self.context.enabled else loss)
        optimizer_steps = engine.global_steps
        engine.step()
        if self.ema is not None and engine.global_steps != optimizer_steps:  # the optimizer stepped
            self.ema.step(self._trainable(), engine.global_steps)

    # ------------------------------------------------------------------ weights and checkpoints

    @ray.method(num_returns=2)
    def publish(self, version: int, broadcast: bool = False):
        """Publish `version`: the trainable weights (LoRA adapters, or the full state), gathered under
        ZeRO-3, so every rank must call it. Rank 0 returns a CPU copy for the object store: what the
        rollout workers fetch, or, with `broadcast`, the recovery copy the driver keeps for a restarted
        rollout worker and for async checkpoints, after sending the tensors to the weight group (the
        rollout workers receive them in place). Returns (version, copy) on rank 0, (version, None) on
        the others: two refs, so the driver can check every rank finished without fetching the weights."""
        maybe_fault(self.cfg, "publish", self.rank, version)
        with self._gathered():
            if self.rank != 0:
                return version, None
            if broadcast:
                self.weight_group().broadcast(sync_tensors(self.engine.module, self.cfg.model.lora.enabled))
            return version, self._weights_copy()

    def _gathered(self):
        """ZeRO-3: gather the published parameters on every rank for the duration (a no-op below stage 3)."""
        import deepspeed

        module = self.engine.module
        params = [p for p in module.parameters() if p.requires_grad] if self.cfg.model.lora.enabled \
            else list(module.parameters())
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def _weights_copy(self) -> Dict[str, torch.Tensor]:
        """Inside `_gathered()`: LoRA adapters in peft format, or a CPU copy of the full state dict."""
        return published_weights(self.engine.module, self.cfg.model.lora.enabled)

    def ema_weights(self) -> Dict[str, torch.Tensor]:
        """The EMA weights in the published format (what the held-out monitor evaluates). ZeRO <= 2 only, where
        every rank holds them whole, so one rank answers."""
        with self.ema.swapped_in(self._trainable()):
            return self._weights_copy()

    def save(self, directory: str) -> None:
        """Engine state (model + optimizer + lr schedule) by every rank; by rank 0: the LoRA in diffusers format
        and, with an EMA, its state (learner/ema.pt) and its LoRA (lora_ema/, what evaluation loads)."""
        import deepspeed

        directory = Path(directory)
        self.engine.save_checkpoint(str(directory / "learner"), tag=ENGINE_TAG)
        if self.cfg.model.lora.enabled:
            params = [p for p in self.engine.module.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if self.rank == 0:
                    save_lora(self.engine.module, directory / "lora", self.cfg.model.kind)
        if self.ema is not None and self.rank == 0:
            torch.save(self.ema.state_dict(), directory / "learner" / EMA_FILE)
            if self.cfg.model.lora.enabled:
                with self.ema.swapped_in(self._trainable()):
                    save_lora(self.engine.module, directory / "lora_ema", self.cfg.model.kind)
        torch.save(torch.get_rng_state(), directory / "learner" / f"rng_rank{self.rank}.pt")

    def load(self, directory: str) -> None:
        directory = Path(directory)
        path, _ = self.engine.load_checkpoint(str(directory / "learner"), tag=ENGINE_TAG)
        if path is None:
            raise FileNotFoundError(f"no learner engine state under {directory / 'learner'}")
        if self.ema is not None:
            ema_file = directory / "learner" / EMA_FILE
            if not ema_file.is_file():
                raise FileNotFoundError(f"optim.ema.enabled but the checkpoint has no EMA state: {ema_file} (it was "
                                        "written without the EMA; resume it with optim.ema.enabled=false)")
            self.ema.load_state_dict(torch.load(ema_file, weights_only=True))
        rng = directory / "learner" / f"rng_rank{self.rank}.pt"
        if rng.exists():
            torch.set_rng_state(torch.load(rng, weights_only=True))
