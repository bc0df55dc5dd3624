"""Generate and score: fixed prompts and seeds, the deterministic sampler, every metric per video.

`held_out_monitor(policy, cfg, prompts, seeds)` is the same evaluation for the training loop: every
`logging.eval_every` steps it scores a held-out prompt set with the current weights and returns
`heldout_<metric>` numbers to log next to the training reward (over-optimisation shows as the trained
reward rising while the face similarity or the identity model's score on held-out prompts does not).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf

from evaluation.metrics import EvalScorer, summarize_records
from evaluation.policies import EvalError

log = logging.getLogger("identity_grpo.evaluate")
SEED_DOMAIN = 0x5EED_E7A1  # keeps evaluation seeds apart from training's sample_seed streams


def load_prompts(pattern: str | Sequence[str], num_prompts: int, on_error: str = "raise") -> List[dict]:
    """The first `num_prompts` prompt samples in file order (no shuffle: every run sees the same ones)."""
    from data.reader import ShardReader

    if num_prompts < 1:
        raise EvalError(f"--num-prompts must be >= 1, got {num_prompts}")
    prompts, seen = [], set()
    for sample in ShardReader(pattern, kind="prompt", shuffle=False, epochs=1, on_error=on_error):
        key = sample["key"] if sample["key"] not in seen else f"{Path(sample['shard']).name}/{sample['key']}"
        seen.add(key)
        refs = list(sample["refs"])
        ids = list(sample.get("meta", {}).get("identity_ids") or [f"person_{k}" for k in range(len(refs))])
        prompts.append({"key": key, "prompt": sample["prompt"], "refs": refs, "identity_ids": ids})
        if len(prompts) == num_prompts:
            break
    if len(prompts) < num_prompts:
        log.warning("prompt shards %s hold %d prompt(s), fewer than the %d asked for", pattern, len(prompts),
                    num_prompts)
    return prompts


def eval_seeds(base_seed: int, seeds_per_prompt: int) -> List[int]:
    """K fixed seeds, used for every prompt and every policy (so samples pair up across policies)."""
    if seeds_per_prompt < 1:
        raise EvalError(f"--seeds-per-prompt must be >= 1, got {seeds_per_prompt}")
    state = np.random.SeedSequence([SEED_DOMAIN, int(base_seed)]).generate_state(seeds_per_prompt, np.uint64)
    return [int(s >> np.uint64(1)) for s in state]


# ----------------------------------------------------------------------------- generate and score


def evaluate_policy(policy, cfg, prompts: Sequence[dict], seeds: Sequence[int], scorer: EvalScorer,
                    tag: str = "policy", keep_videos: int = 0, video_dir: Optional[Path] = None):
    """Sample and score K videos per prompt with the policy's current weights.

    Returns (records, kept): one record per video; kept[key] = the (K, F, H, W, 3) uint8 videos of the
    first `keep_videos` prompts (for the report's grid). Prompt groups are generated and scored one at
    a time, so memory stays one group's videos whatever N is.
    """
    sampling = PromptSampling.from_config(cfg)
    records, kept = [], {}
    for i, sample in enumerate(prompts):
        rows, videos = evaluate_prompt(policy, sampling, sample, seeds, scorer, tag)
        records.extend(rows)
        if i < keep_videos:
            kept[sample["key"]] = videos
        if video_dir is not None:
            write_videos(video_dir, sample["key"], encode_videos(videos))
    return records, kept


@dataclass(frozen=True)
class PromptSampling:
    """How evaluation samples: the config's noise rule and timestep schedule, always deterministically."""

    rule: object
    schedule: object

    @classmethod
    def from_config(cls, cfg) -> "PromptSampling":
        from policy.schedule import schedule_from_config
        from policy.sde import NoiseRule

        return cls(NoiseRule.from_config(cfg.sampler), schedule_from_config(cfg.sampler))


def evaluate_prompt(policy, sampling: PromptSampling, sample: dict, seeds: Sequence[int], scorer: EvalScorer,
                    tag: str) -> Tuple[List[dict], np.ndarray]:
    """One prompt's K videos (the ODE from K fixed seeds) and their records: the unit of work of the
    in-process loop above and of the Ray evaluation workers (workers/eval_worker.py) alike, so both
    produce the same records for the same prompt."""
    from policy.sampler import sample_group

    cond = policy.encode_condition(sample["prompt"], sample["refs"])
    traj = sample_group(policy, cond, seeds, sampling.rule, sampling.schedule, deterministic=True)
    videos = traj.videos.numpy()
    rows = scorer.score(list(videos), [sample["refs"]] * len(videos), [sample["prompt"]] * len(videos))
    records = [{"policy": tag, "key": sample["key"], "prompt": sample["prompt"], "seed_index": k, "seed": int(seed),
                "num_people": len(sample["refs"]), "identity_ids": sample["identity_ids"], **row}
               for k, (seed, row) in enumerate(zip(seeds, rows, strict=True))]
    return records, videos


def encode_videos(videos: np.ndarray) -> List[bytes]:
    from data.video import encode_video

    return [encode_video(video) for video in videos]


def write_videos(video_dir: Path, key: str, mp4s: Sequence[bytes]) -> None:
    """`--save-videos`: `<video_dir>/<key>_s<k>.mp4` per seed index k."""
    video_dir.mkdir(parents=True, exist_ok=True)
    for k, mp4 in enumerate(mp4s):
        (video_dir / f"{_safe(key)}_s{k}.mp4").write_bytes(mp4)


_SCORERS: Dict[str, EvalScorer] = {}


def shared_scorer(reward_cfg) -> EvalScorer:
    """One EvalScorer per reward config per process (the face and VLM models load once), built without
    touching the caller's global RNG, so a training process that calls the monitor resumes identically."""
    key = OmegaConf.to_yaml(reward_cfg)
    if key not in _SCORERS:
        with torch.random.fork_rng(devices=[]):
            _SCORERS[key] = EvalScorer(reward_cfg)
    return _SCORERS[key]


def held_out_monitor(policy, cfg, prompts: Sequence[dict], seeds: Sequence[int],
                     prefix: str = "heldout_") -> Dict[str, float]:
    """Over-optimisation monitor: evaluate held-out prompts with the policy's current weights.

    `prompts` come from `load_prompts(cfg.data.eval_prompt_shards, ...)` and `seeds` from `eval_seeds`,
    the same every call, so a change between calls is the weights'. Returns the mean of every metric as
    `<prefix><metric>` (face_mean, face_min, face_found_frac, vlm if configured, reward_total and
    reward_<name>) plus `<prefix>failed`, the number of failed metric values. The face metrics (and the
    VLM when it has weight 0) are rewards the policy is not trained on. Deterministic sampling; the
    caller's RNG state and the transformer's train/eval mode are left as they were.
    """
    scorer = shared_scorer(cfg.reward)
    was_training = policy.transformer.training
    policy.transformer.eval()
    try:
        records, _ = evaluate_policy(policy, cfg, prompts, seeds, scorer, tag="heldout")
    finally:
        policy.transformer.train(was_training)
    summary = summarize_records(records)
    out = {f"{prefix}{name}": (math.nan if m["mean"] is None else m["mean"]) for name, m in summary["metrics"].items()}
    out[f"{prefix}failed"] = sum(m["failed"] for m in summary["metrics"].values())
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
