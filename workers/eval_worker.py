"""Evaluation worker: a policy and the evaluation scorer on one device, evaluating one prompt per call.

`launcher.evaluate --num-workers N` spreads a policy's prompts over N of these (one GPU each, like the
rollout workers) instead of running them in its own process. A call carries everything its result depends
on (the policy spec, a box holding the LoRA tensors, the prompt, the seeds), and each prompt is sampled and
scored by the same function as in-process evaluation (evaluation/held_out.py `evaluate_prompt`), so the
records equal the single-process run's, and a worker Ray restarts re-runs its lost call to the same result.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import ray
import torch

from evaluation.held_out import PromptSampling, encode_videos, evaluate_prompt
from evaluation.metrics import EvalScorer
from evaluation.policies import PolicySpec, build_eval_policy, policy_weights
from runtime.cpu_bf16 import bf16_matmuls_in_fp32
from workers.common import WorkerBase, maybe_fault

log = logging.getLogger(__name__)


class EvalWorker(WorkerBase):
    def __init__(self, rank: int, world_size: int, cfg_yaml: str):
        super().__init__(rank, world_size, cfg_yaml)
        self.policy = build_eval_policy(self.cfg)
        self.scorer = EvalScorer(self.cfg.reward)
        self.sampling = PromptSampling.from_config(self.cfg)
        self._lora: Tuple[Optional[str], Optional[Dict[str, torch.Tensor]]] = (None, None)

    def memory_modules(self) -> Dict[str, torch.nn.Module]:
        c = self.policy.components
        return {"transformer": self.policy.transformer, "text_encoder": c.text_encoder, "vae": c.vae}

    def _lora_state(self, spec: PolicySpec, lora_box: List[ray.ObjectRef]) -> Optional[Dict[str, torch.Tensor]]:
        """The spec's LoRA tensors, fetched from the object store once per policy (None for the base model)."""
        if spec.lora_file is None:
            return None
        if self._lora[0] != spec.tag:
            self._lora = (spec.tag, ray.get(lora_box[0]))
        return self._lora[1]

    def evaluate_prompt(self, spec: PolicySpec, lora_box: List[ray.ObjectRef], index: int, sample: dict,
                        seeds: Sequence[int], keep_frames: bool,
                        encode: bool) -> Tuple[List[dict], Optional[object], Optional[List[bytes]]]:
        """(records, the (K, F, H, W, 3) uint8 videos if `keep_frames`, their mp4 bytes if `encode`) of prompt
        number `index`, `sample`, sampled with `spec`'s weights."""
        maybe_fault(self.cfg, "eval", self.rank, index)
        with bf16_matmuls_in_fp32(self.cfg.trainer.device, self.cfg.model.dtype), \
                policy_weights(self.policy, spec, self._lora_state(spec, lora_box)):
            records, videos = evaluate_prompt(self.policy, self.sampling, sample, seeds, self.scorer, spec.tag)
        return records, videos if keep_frames else None, encode_videos(videos) if encode else None
