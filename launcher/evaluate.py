"""Evaluate a policy (the base model or a checkpoint's LoRA) on fixed prompts and seeds; compare two.

    python -m launcher.evaluate --config FILE [--checkpoint latest|base|PATH] [--compare latest|base|PATH]
        [--num-prompts N] [--seeds-per-prompt K] [--prompt-shards PATTERN] [--out DIR] [key=value ...]

What it does, per policy: read the first N prompt samples (text + one reference photo per person) of
the prompt shards in file order, sample K videos per prompt with the *deterministic* sampler (the ODE,
std = 0) from K fixed seeds, so two policies see exactly the same starting noise and any difference is
the weights'; score every video (launcher/eval_metrics.py: identity reward model, face similarity mean
and min over people, frames with every person found, the training reward components); write
`<out>/<tag>/samples.jsonl` (one line per video) and `<out>/<tag>/summary.json`. With --compare, the
first policy is the candidate and the second the baseline: `<out>/comparison.json` holds paired deltas
with bootstrap confidence intervals and win rates. Finally `<out>/report.md` with plots and a video grid
(launcher/report.py), also logged to TensorBoard under `<trainer.output_dir>/tb`, tags `eval/...`.

A PATH is a checkpoint step directory (`<output_dir>/checkpoints/step_NNNNNN`), a run's output
directory (its latest checkpoint), a `lora/` directory or the `pytorch_lora_weights.safetensors` file
itself (diffusers format, `transformer.`-prefixed keys). `latest` is the latest checkpoint of
`trainer.output_dir`. The LoRA must have been trained with this config's model settings (kind, base
model, rank, alpha, targets); a checkpoint's stored config.yaml is checked and a mismatch names the key.

`held_out_monitor(policy, cfg, prompts, seeds)` is the same evaluation for the training loop: every
`logging.eval_every` steps it scores a held-out prompt set with the current weights and returns
`heldout_<metric>` numbers to log next to the training reward (over-optimisation shows as the trained
reward rising while the face similarity or the identity model's score on held-out prompts does not).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from launcher.checkpoint import CheckpointManager
from launcher.cli import at_least, build_parser, parse_config
from launcher.config import LORA_KEYS, stored_config_mismatches
from launcher.eval_metrics import EvalScorer, compare_records, summarize_records

log = logging.getLogger("identity_grpo.evaluate")
SEED_DOMAIN = 0x5EED_E7A1  # keeps evaluation seeds apart from training's sample_seed streams
class EvalError(ValueError):
    """A policy to evaluate cannot be found or does not fit the config; the message names it."""


# ----------------------------------------------------------------------------- which policy


LORA_DIRS = ("lora", "lora_ema")  # a checkpoint's live and EMA adapters (workers/learner.py save)


@dataclass(frozen=True)
class PolicySpec:
    tag: str  # directory name and label in the report
    source: str  # what the user asked for, for the report
    lora_file: Optional[Path] = None  # None: the base model (adapters off)
    checkpoint: Optional[Path] = None  # step directory, when known (holds config.yaml)
    step: int = 0


def resolve_policy(spec: str, output_dir: str | Path, weights: str = "ema") -> PolicySpec:
    """'base' | 'latest' | a checkpoint dir, run dir, lora dir or LoRA file -> PolicySpec (see module doc).
    weights: of a checkpoint directory, "ema" takes its EMA weights (lora_ema/) when it has them (what the
    official code evaluates), "live" the trained ones (lora/)."""
    from policy.lora import LORA_FILE

    if weights not in ("ema", "live"):
        raise EvalError(f"--weights must be ema or live, got {weights!r}")
    if spec == "base":
        return PolicySpec("base", "base")
    if spec == "latest":
        try:
            path = CheckpointManager(output_dir).latest()
        except FileNotFoundError as err:
            raise EvalError(f"--checkpoint latest: {err}") from None
        if path is None:
            raise EvalError(f"--checkpoint latest: no checkpoint under {Path(output_dir) / 'checkpoints'} "
                            "(trainer.output_dir); pass a checkpoint path or 'base'")
    else:
        path = Path(spec)
    if not path.exists():
        raise EvalError(f"checkpoint {spec!r}: {path} does not exist")
    if path.is_dir() and (path / "checkpoints").is_dir() and not (path / "lora").exists():
        latest = CheckpointManager(path).latest()  # a run's output directory
        if latest is None:
            raise EvalError(f"checkpoint {spec!r}: run directory {path} has no complete checkpoint")
        path = latest
    if path.is_file():
        lora_file, step_dir = path, path.parent.parent if path.parent.name in LORA_DIRS else None
    elif (path / LORA_FILE).is_file():
        lora_file, step_dir = path / LORA_FILE, path.parent if path.name in LORA_DIRS else None
    elif weights == "ema" and (path / "lora_ema" / LORA_FILE).is_file():
        lora_file, step_dir = path / "lora_ema" / LORA_FILE, path
    elif (path / "lora" / LORA_FILE).is_file():
        lora_file, step_dir = path / "lora" / LORA_FILE, path
    else:
        raise EvalError(f"checkpoint {spec!r}: no LoRA weights at {path} (looked for {LORA_FILE}, lora/{LORA_FILE}); "
                        "full fine-tuning checkpoints (model.lora.enabled=false) are not supported yet")
    match = re.match(r"step_(\d+)$", step_dir.name) if step_dir is not None else None
    tag = step_dir.name if step_dir is not None else lora_file.parent.name
    if step_dir is not None and lora_file.parent.name == "lora_ema":
        tag += "_ema"
    return PolicySpec(tag, spec, lora_file, step_dir, int(match.group(1)) if match else 0)


def check_compatible(spec: PolicySpec, cfg) -> None:
    """The checkpoint's stored model settings must equal this config's (a LoRA means nothing on another base)."""
    if spec.lora_file is None:
        return
    if not cfg.model.lora.enabled:
        raise EvalError(f"{spec.source}: a LoRA checkpoint needs model.lora.enabled=true")
    stored = spec.checkpoint / "config.yaml" if spec.checkpoint is not None else None
    if stored is None or not stored.is_file():
        log.warning("%s: no stored config.yaml; assuming it was trained with this config's model settings", spec.source)
        return
    saved = OmegaConf.create(stored.read_text())
    if saved.model.get("path") != cfg.model.path:  # may be the same weights in another place: only warn
        log.warning("%s: trained on model.path=%s, evaluating on %s", spec.source, saved.model.get("path"),
                    cfg.model.path)
    for key, theirs, mine in stored_config_mismatches(stored, cfg, LORA_KEYS)[:1]:
        raise EvalError(f"{spec.source}: trained with {key}={theirs!r} ({stored}) but the config has {mine!r}; "
                        f"pass {key}={theirs} or the training config")


def read_lora(path: Path) -> Dict[str, torch.Tensor]:
    """diffusers-format LoRA file -> peft state dict of the transformer (the `transformer.` prefix removed)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    foreign = [k for k in state if not k.startswith("transformer.")]
    if foreign:
        raise EvalError(f"{path}: not a transformer LoRA in diffusers format (keys like {foreign[:3]})")
    return {k[len("transformer."):]: v for k, v in state.items()}


@contextlib.contextmanager
def policy_weights(policy, spec: PolicySpec):
    """Within the block the policy samples with `spec`'s weights: adapters off for 'base', else its LoRA."""
    from policy.lora import adapters_disabled, has_lora, load_lora_state_dict

    if spec.lora_file is None:
        with adapters_disabled(policy.transformer) if has_lora(policy.transformer) else contextlib.nullcontext():
            yield
        return
    try:
        load_lora_state_dict(policy.transformer, read_lora(spec.lora_file))
    except (KeyError, RuntimeError) as err:
        raise EvalError(f"{spec.lora_file}: does not fit the model of this config: {err}") from None
    yield


def build_eval_policy(cfg):
    """The policy once (base weights + adapters); each PolicySpec then only swaps the LoRA."""
    from policy.models import build_components
    from policy.policy import WanPolicy

    torch.manual_seed(cfg.trainer.seed)
    policy = WanPolicy(build_components(cfg.model, cfg.sampler.shift), cfg.model, cfg.sampler, cfg.trainer.device)
    policy.transformer.eval()
    return policy


# ----------------------------------------------------------------------------- prompts and seeds


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
    from policy.sampler import sample_group
    from policy.schedule import schedule_from_config
    from policy.sde import NoiseRule

    rule, schedule = NoiseRule.from_config(cfg.sampler), schedule_from_config(cfg.sampler)
    records, kept = [], {}
    for i, sample in enumerate(prompts):
        cond = policy.encode_condition(sample["prompt"], sample["refs"])
        traj = sample_group(policy, cond, seeds, rule, schedule, deterministic=True)
        videos = traj.videos.numpy()
        rows = scorer.score(list(videos), [sample["refs"]] * len(videos), [sample["prompt"]] * len(videos))
        for k, (seed, row) in enumerate(zip(seeds, rows, strict=True)):
            records.append({"policy": tag, "key": sample["key"], "prompt": sample["prompt"], "seed_index": k,
                            "seed": int(seed), "num_people": len(sample["refs"]),
                            "identity_ids": sample["identity_ids"], **row})
        if i < keep_videos:
            kept[sample["key"]] = videos
        if video_dir is not None:
            from data.video import encode_video

            video_dir.mkdir(parents=True, exist_ok=True)
            for k, video in enumerate(videos):
                (video_dir / f"{_safe(sample['key'])}_s{k}.mp4").write_bytes(encode_video(video))
    return records, kept


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


# ----------------------------------------------------------------------------- files


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def json_clean(value):
    """NaN/inf -> None (JSON null), numpy scalars -> Python: output any JSON reader accepts."""
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_clean(value), indent=2, allow_nan=False) + "\n")
    return path


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(json_clean(r), allow_nan=False) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- CLI


def _parser():
    parser = build_parser(__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--checkpoint", default="latest", help="latest | base | PATH (default: %(default)s)")
    parser.add_argument("--weights", default="ema", choices=["ema", "live"],
                        help="a checkpoint's EMA weights when it has them (official eval), or the live ones")
    parser.add_argument("--compare", default=None, help="baseline policy to compare with: latest | base | PATH")
    parser.add_argument("--num-prompts", type=at_least(1), default=None,
                        help="prompts (default: logging.eval_num_prompts or 8)")
    parser.add_argument("--seeds-per-prompt", type=at_least(1), default=None,
                        help="videos per prompt (default: logging.eval_seeds_per_prompt or 2)")
    parser.add_argument("--prompt-shards", default=None,
                        help="prompt shard pattern (default: data.eval_prompt_shards, else data.prompt_shards)")
    parser.add_argument("--out", default=None, help="output directory (default: <trainer.output_dir>/eval)")
    parser.add_argument("--grid-prompts", type=at_least(0), default=4, help="prompts shown in the video grid")
    parser.add_argument("--save-videos", action="store_true", help="also write every video as mp4")
    parser.add_argument("--no-tensorboard", action="store_true", help="do not log the plots to TensorBoard")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg, args = parse_config(__doc__, argv, _parser(), command="evaluate")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return run(cfg, args)
    except (EvalError, FileNotFoundError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run(cfg, args) -> dict:
    from launcher import report

    output_dir = Path(cfg.trainer.output_dir)
    out = Path(args.out) if args.out else output_dir / "eval"
    specs = [resolve_policy(args.checkpoint, output_dir, args.weights)]
    if args.compare:
        baseline = resolve_policy(args.compare, output_dir, args.weights)
        specs.append(replace(baseline, tag=baseline.tag + "_compare") if baseline.tag == specs[0].tag else baseline)
    for spec in specs:
        check_compatible(spec, cfg)
    pattern = args.prompt_shards or getattr(cfg.data, "eval_prompt_shards", None) or cfg.data.prompt_shards
    num_prompts = args.num_prompts or getattr(cfg.logging, "eval_num_prompts", None) or 8
    k = args.seeds_per_prompt or getattr(cfg.logging, "eval_seeds_per_prompt", None) or 2
    prompts, seeds = load_prompts(pattern, num_prompts, cfg.data.on_error), eval_seeds(cfg.trainer.seed, k)
    if not prompts:
        raise EvalError(f"prompt shards {pattern}: no prompt sample to evaluate")
    policy, scorer = build_eval_policy(cfg), EvalScorer(cfg.reward)
    setup = {"prompt_shards": pattern, "num_prompts": len(prompts), "seeds": seeds, "sampler": "deterministic",
             "num_steps": cfg.sampler.num_steps, "guidance_scale": cfg.sampler.guidance_scale,
             "reward_weights": dict(cfg.reward.weights), "trained_components": scorer.trained_names}
    runs = []
    for spec in specs:
        log.info("evaluating %s (%s) on %d prompts x %d seeds", spec.tag, spec.source, len(prompts), len(seeds))
        with policy_weights(policy, spec):
            records, kept = evaluate_policy(policy, cfg, prompts, seeds, scorer, spec.tag, args.grid_prompts,
                                            out / spec.tag / "videos" if args.save_videos else None)
        summary = {"policy": spec.tag, "source": spec.source, "lora_file": str(spec.lora_file or ""),
                   "step": spec.step, **setup, **summarize_records(records)}
        write_jsonl(out / spec.tag / "samples.jsonl", records)
        write_json(out / spec.tag / "summary.json", summary)
        runs.append(report.EvalRun(spec.tag, spec.source, spec.step, records, summary, kept))
    comparison = None
    if len(runs) == 2:
        comparison = compare_records(runs[0].records, runs[1].records, runs[0].tag, runs[1].tag,
                                     seed=cfg.trainer.seed).to_dict()
        write_json(out / "comparison.json", comparison)
    tb_dir = None if args.no_tensorboard or not cfg.logging.tensorboard else output_dir / "tb"
    path = report.write_report(out, runs, comparison, prompts[: args.grid_prompts], output_dir,
                               scorer.trained_names, tb_dir)
    for line in report.summary_lines(runs, comparison):
        print(line)
    print(f"report: {path}")
    return {"out": out, "report": path, "summaries": [r.summary for r in runs], "comparison": comparison}


if __name__ == "__main__":
    main()
