"""Reward worker: scores the videos of trajectories it receives by object ref (not via the driver)."""

from __future__ import annotations

from typing import Dict, List

from workers.common import WorkerBase, maybe_fault


class RewardWorker(WorkerBase):
    def __init__(self, rank: int, world_size: int, cfg_yaml: str):
        super().__init__(rank, world_size, cfg_yaml)
        from reward.composite import CompositeReward

        self.reward = CompositeReward.from_config(self.cfg.reward)

    def memory_modules(self) -> Dict[str, object]:
        """The torch models behind the reward components (a bound `score` of an nn.Module, e.g. the VLM)."""
        import torch

        out = {}
        for name, fn in self.reward.components.items():
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, torch.nn.Module):
                out[name] = owner
        return out

    def score(self, step: int, *trajectories) -> List[Dict]:
        """Per trajectory: {"scores": {component: (G,), "total": weighted sum (NaN where a score failed)},
        plus the trajectory's policy version, rollout time and sampled steps, so the driver never fetches
        trajectories."""
        from runtime.cpu_bf16 import bf16_matmuls_in_fp32

        maybe_fault(self.cfg, "reward", self.rank, step)
        out = []
        for traj in trajectories:
            videos = list(traj.videos)
            with bf16_matmuls_in_fp32(self.cfg.trainer.device, self.cfg.reward.vlm.dtype):  # AVX2 CPUs: rehearsals
                scores = self.reward.score(videos, [traj.references] * len(videos), [traj.prompt] * len(videos))
            out.append({"scores": {k: v.detach().cpu().double() for k, v in scores.items()},
                        "policy_version": traj.policy_version, "rollout_s": traj.rollout_s,
                        "rollout_steps": traj.num_steps})
        return out
