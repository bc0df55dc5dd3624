"""Rollout worker: samples groups of videos with the current policy and records their trajectories.

A policy version arrives by `receive_weights` (broadcast from learner rank 0, workers/weight_sync.py)
or by `set_weights` (an object-store copy); `generate` carries the version it must sample with and a
ref to that version's copy, which only a restarted or lagging worker fetches.

With context parallelism (`model.context_parallel`, policy/context_parallel.py) a rollout worker is `degree` actors,
one GPU each, that sample each video together: the driver calls all of them with the same arguments
(workers/group.py's call units), each computes the whole trajectory (the transformer's output is gathered), and the
first answers for the group while the others return None. They form a process group of their own
(`join_context_group`), apart from the weight group every actor belongs to.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional

import ray
import torch

from config import to_yaml
from policy.context_parallel import ContextDegrees
from policy.lora import load_lora_state_dict
from policy.models import build_components
from policy.ode import OdeSolver
from policy.policy import WanPolicy
from policy.precision import dtype_map
from policy.sampler import Trajectory, sample_group
from policy.schedule import schedule_from_config
from policy.sde import NoiseRule
from runtime.cpu_bf16 import bf16_matmuls_in_fp32
from workers.common import WorkerBase, maybe_fault, published_weights
from workers.group import WorkerGroup
from workers.ray_cluster import RESTARTABLE
from workers.weight_sync import WeightGroupMember, sync_tensors

log = logging.getLogger(__name__)


class RolloutWorker(WeightGroupMember, WorkerBase):
    def __init__(self, rank: int, world_size: int, cfg_yaml: str):
        super().__init__(rank, world_size, cfg_yaml)
        cfg = self.cfg
        torch.manual_seed(cfg.trainer.seed)  # adapters are initialised like the learner's; synced anyway
        self.policy = WanPolicy(build_components(cfg.model, cfg.sampler.shift), cfg.model, cfg.sampler,
                                device=cfg.trainer.device)
        self.policy.transformer.eval()
        self.rule = NoiseRule.from_config(cfg.sampler)
        self.schedule = schedule_from_config(cfg.sampler)
        self.ode = OdeSolver.from_config(cfg.sampler)  # training rollouts' ODE steps (candidates and evaluation: Euler)
        self.version = -1
        self.fetched_versions: List[int] = []  # versions installed from the object-store copy (recovery)
        self.context = ContextDegrees.from_config(cfg.model)
        self.answers = rank % self.context.size == 0  # the first actor of a context group returns its results

    def join_context_group(self, master_addr: str, master_port: int) -> None:
        """Form this actor's context group (`degree` consecutive rollout ranks; the first one's address) and split the
        policy's transformers over it. Collective: the group's actors call it together. Its collectives time out
        after `workers.weight_sync_timeout_s`, so a dead peer raises instead of hanging the others."""
        from datetime import timedelta

        from policy.context_parallel import context_mesh, parallelize_policy

        device_type = torch.device(self.cfg.trainer.device).type
        torch.distributed.init_process_group(
            "gloo" if device_type == "cpu" else "nccl", init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank % self.context.size, world_size=self.context.size,
            timeout=timedelta(seconds=self.cfg.workers.weight_sync_timeout_s))
        parallelize_policy(self.policy, self.context, context_mesh(self.context, device_type))

    def matmul_kernels(self):
        """bf16 on an AVX2-only CPU: linear and conv3d layers in float32, as in the learner (runtime/cpu_bf16.py)."""
        return bf16_matmuls_in_fp32(self.cfg.trainer.device, self.cfg.model.dtype)

    def set_weights(self, version: int, weights: Dict[str, torch.Tensor]) -> int:
        """Install a published policy version: LoRA adapter weights, or the full state dict."""
        self._install(weights)
        self.version = version
        return version

    def _ensure_version(self, version: int, weights_box: Optional[list]) -> None:
        """Hold `version` before sampling with it: a worker Ray restarted (back at its initial weights) or one
        that lags fetches the version's object-store copy, so a re-run call reproduces the lost one."""
        if version == self.version:
            return
        if weights_box is None:
            raise RuntimeError(f"rollout {self.rank}: has version {self.version}, asked for {version} without weights")
        log.info("rollout %d: fetching version %d's object-store copy (has %d)", self.rank, version, self.version)
        self.set_weights(version, ray.get(weights_box[0]))
        self.fetched_versions.append(version)

    def _install(self, weights: Dict[str, torch.Tensor]) -> None:
        if self.cfg.model.lora.enabled:
            load_lora_state_dict(self.policy.transformer, weights)
        else:
            self.policy.transformer.load_state_dict(weights, strict=True)

    def receive_weights(self, version: int) -> int:
        """Install a policy version broadcast by learner rank 0, in place into the model's own tensors.
        Until it is all in, the worker claims no version, so a failed receive is never sampled with."""
        self.version = -1
        self.weight_group().receive(sync_tensors(self.policy.transformer, self.cfg.model.lora.enabled))
        self.version = version
        return version

    def memory_modules(self) -> Dict[str, torch.nn.Module]:
        c = self.policy.components
        return {"transformer": self.policy.transformer, "reference": self.policy.reference_transformer,
                "text_encoder": c.text_encoder, "vae": c.vae}

    def policy_dtypes(self) -> Dict[str, str]:
        """{parameter: dtype} of the transformer it samples with (must equal the learner's)."""
        return dtype_map(self.policy.transformer)

    def weight_status(self) -> Dict[str, object]:
        """Which version this worker holds, its weight-group epoch, and the versions it had to fetch."""
        return {"version": self.version, "epoch": self.weight_group_epoch(), "fetched": list(self.fetched_versions)}

    def generate(self, step: int, sample: dict, seeds: List[int], version: int,
                 weights_box: Optional[list] = None, deterministic: bool = False,
                 sde_steps: Optional[List[int]] = None) -> Trajectory:
        """One prompt group. `weights_box` = [ref] of that version's weights: a restarted or lagging
        worker fetches them first, so a re-queued task samples with exactly the recorded version.
        `sde_steps`: the step's SDE window (policy/window.py), None for every step."""
        maybe_fault(self.cfg, "rollout", self.rank, step)
        self._ensure_version(version, weights_box)
        start = time.perf_counter()
        with self.matmul_kernels():
            cond = self.policy.encode_condition(sample["prompt"], sample.get("refs", []))
            # in the learner's micro-batches: its recompute then sees this forward's shapes (policy/sampler.py)
            trajectory = sample_group(self.policy, cond, seeds, self.rule, self.schedule, deterministic=deterministic,
                                      policy_version=version, sde_steps=sde_steps, ode=self.ode,
                                      rows_per_forward=self.cfg.workers.learner_engine.micro_batch_size,
                                      shared_initial_noise=self.cfg.sampler.shared_initial_noise,
                                      decode=self.answers)  # a context group's other actors decode nothing
        trajectory.prompt, trajectory.key = sample["prompt"], sample.get("key", "")
        trajectory.references = list(sample.get("refs", []))
        trajectory.rollout_s = time.perf_counter() - start
        return trajectory if self.answers else None

    def candidate_videos(self, sample: dict, seeds: List[int], deterministic: bool, fps: float,
                         version: Optional[int] = None, weights_box: Optional[list] = None) -> List[tuple]:
        """One prompt's videos as (mp4 bytes, VideoInfo dict), for prefdata/candidates.py (preference data): only the
        encoded videos travel back, not the trajectory. With `version` (and `weights_box` = [ref] of its weights)
        it samples with those weights, fetched first by a worker Ray restarted; without, with the base model (LoRA
        off)."""
        from contextlib import nullcontext

        from data.video import VideoInfo, encode_video
        from policy.lora import adapters_disabled, has_lora

        adapters = version is not None
        if adapters:
            self._ensure_version(version, weights_box)
        base_only = not adapters and has_lora(self.policy.transformer)
        with self.matmul_kernels(), adapters_disabled(self.policy.transformer) if base_only else nullcontext():
            cond = self.policy.encode_condition(sample["prompt"], sample.get("refs", []))
            trajectory = sample_group(self.policy, cond, seeds, self.rule, self.schedule, deterministic=deterministic,
                                      decode=self.answers)
        if not self.answers:
            return []
        return [(encode_video(v, fps), VideoInfo(v.shape[0], float(fps), v.shape[1], v.shape[2]).to_dict())
                for v in trajectory.videos.numpy()]

    def held_out(self, prompts: List[dict], seeds: List[int], version: int, weights_box: list,
                 weights: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, float]:
        """Over-optimisation monitor (evaluation/held_out.py) with policy `version` (fetched from `weights_box` by a
        worker Ray restarted mid-call, like `generate`), or with `weights` (the EMA's) installed for the
        duration and the version's put back after."""
        from evaluation.held_out import held_out_monitor

        self._ensure_version(version, weights_box)
        if weights is None:
            with self.matmul_kernels():
                return held_out_monitor(self.policy, self.cfg, prompts, seeds)
        live = published_weights(self.policy.transformer, self.cfg.model.lora.enabled)
        self._install(weights)
        try:
            with self.matmul_kernels():
                return held_out_monitor(self.policy, self.cfg, prompts, seeds)
        finally:
            self._install(live)


def rollout_group(name: str, placement, cfg) -> WorkerGroup:
    """The rollout workers of a run or a tool. One actor per call, restartable (Ray re-runs a lost call with the same
    arguments, so the sample is the same); or, with context parallelism, call units of `degree` actors in their own
    process groups, not restarted one by one: a collective cannot lose a member, so the driver gang-restarts them
    (launcher/train.py `recover_rollouts`)."""
    context = ContextDegrees.from_config(cfg.model)
    restarts = RESTARTABLE if not context.enabled else {}
    group = WorkerGroup(name, RolloutWorker, placement, (to_yaml(cfg),), actors_per_call=context.size, **restarts)
    group.join_context_groups()
    return group
