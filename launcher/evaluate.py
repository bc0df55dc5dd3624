"""Evaluate a policy (the base model or a checkpoint's LoRA) on fixed prompts and seeds; compare two.

    python -m launcher.evaluate --config FILE [--checkpoint latest|base|PATH] [--compare latest|base|PATH]
        [--num-prompts N] [--seeds-per-prompt K] [--prompt-shards PATTERN] [--out DIR] [--num-workers W]
        [key=value ...]

What it does, per policy: read the first N prompt samples (text + one reference photo per person) of
the prompt shards in file order, sample K videos per prompt with the *deterministic* sampler (the ODE,
std = 0) from K fixed seeds, so two policies see exactly the same starting noise and any difference is
the weights'; score every video (evaluation/metrics.py: identity reward model, face similarity mean
and min over people, frames with every person found, the training reward components); write
`<out>/<tag>/samples.jsonl` (one line per video) and `<out>/<tag>/summary.json`. With --compare, the
first policy is the candidate and the second the baseline: `<out>/comparison.json` holds paired deltas
with bootstrap confidence intervals and win rates. Finally `<out>/report.md` with plots and a video grid
(evaluation/report.py), also logged to TensorBoard under `<trainer.output_dir>/tb`, tags `eval/...`.

Where: in this process (`--num-workers 0`, the default), or on W Ray evaluation workers (workers/eval_worker.py),
each with `workers.rollout`'s GPUs and CPUs per worker: a node's 8 GPUs are `--num-workers 8`. The Ray cluster is
`workers.ray_address` / $RAY_ADDRESS, else a local one. Prompts stream over the workers and their records come
back in prompt order; each prompt is sampled and scored by the same function either way, so the files are the
same as one process's (the summary also says how many workers made it).

A PATH is a checkpoint step directory (`<output_dir>/checkpoints/step_NNNNNN`), a run's output
directory (its latest checkpoint), a `lora/` directory or the `pytorch_lora_weights.safetensors` file
itself (diffusers format, `transformer.`-prefixed keys). `latest` is the latest checkpoint of
`trainer.output_dir`. The LoRA must have been trained with this config's model settings (kind, base
model, rank, alpha, targets); a checkpoint's stored config.yaml is checked and a mismatch names the key.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from config.checks import context_degree
from config.cli import at_least, build_parser, expected_errors, parse_config, require_writable
from evaluation.files import write_json, write_jsonl
from evaluation.held_out import eval_seeds, load_prompts
from evaluation.metrics import compare_records, summarize_records, trained_components
from evaluation.policies import EvalError, check_compatible, resolve_policy, trained_guidance
from launcher.evaluate_where import evaluator
from workers.run_config import load_run_config

log = logging.getLogger("identity_grpo.evaluate")


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
    parser.add_argument("--num-workers", type=at_least(0), default=0,
                        help="Ray evaluation workers, each with workers.rollout's GPUs (0: in this process)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg, args = parse_config(__doc__, argv, _parser(), loader=load_run_config, command="evaluate")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with expected_errors("evaluate", FileNotFoundError):
        return run(cfg, args)


def run(cfg, args) -> dict:
    from evaluation import report

    if context_degree(cfg) > 1:
        raise NotImplementedError("model.context_parallel: launcher.evaluate samples each video on one device; "
                                  "evaluate with model.context_parallel.ulysses=1 model.context_parallel.ring=1 "
                                  "(context-parallel evaluation is not built, README limitations)")
    output_dir = Path(cfg.trainer.output_dir)
    out = Path(args.out) if args.out else output_dir / "eval"
    require_writable("--out" if args.out else "trainer.output_dir", str(out))  # before any video is made
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
    setup = {"prompt_shards": pattern, "num_prompts": len(prompts), "seeds": seeds, "sampler": "deterministic",
             "num_steps": cfg.sampler.num_steps, "guidance_scale": cfg.sampler.guidance_scale,
             "reward_weights": dict(cfg.reward.weights), "trained_components": trained_components(cfg.reward),
             "workers": args.num_workers}
    runs = []
    with evaluator(cfg, args.num_workers) as evaluate:
        for spec in specs:
            log.info("evaluating %s (%s) on %d prompts x %d seeds", spec.tag, spec.source, len(prompts), len(seeds))
            records, kept = evaluate(spec, prompts, seeds, args.grid_prompts,
                                     out / spec.tag / "videos" if args.save_videos else None)
            trained_at = trained_guidance(spec)
            if trained_at is not None and trained_at != cfg.sampler.guidance_scale:
                log.warning("%s was trained at sampler.guidance_scale=%g and is evaluated at %g (pass "
                            "sampler.guidance_scale=%g to evaluate it as trained)", spec.source, trained_at,
                            cfg.sampler.guidance_scale, trained_at)
            summary = {"policy": spec.tag, "source": spec.source, "lora_file": str(spec.lora_file or ""),
                       "step": spec.step, "trained_guidance_scale": trained_at, **setup,
                       **summarize_records(records)}
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
                               trained_components(cfg.reward), tb_dir)
    for line in report.summary_lines(runs, comparison):
        print(line)
    print(f"report: {path}")
    return {"out": out, "report": path, "summaries": [r.summary for r in runs], "comparison": comparison}


if __name__ == "__main__":
    main()
