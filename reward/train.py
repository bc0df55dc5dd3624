"""Train the identity reward model on pairwise preferences with DeepSpeed (Identity-GRPO, Sec. 3).

    python -m reward.train --config cluster_configs/reward_local_cpu.yaml [key.sub=value ...] [--print-config]
    torchrun --standalone --nproc-per-node 8 -m reward.train --config cluster_configs/reward_3b_8gpu.yaml
    (= make train-reward NPROC=8 ...; several nodes: cluster_configs/slurm/train_reward.sbatch)

Algorithm, top to bottom (`train`):
1. distributed init from env (single process: defaults filled in; CPU: gloo);
2. scan the shards' labels: held-out split by key, human and auto (auto + synthetic) pools;
3. teacher filter (optional): a teacher trained on human pairs (`teacher.checkpoint`, or trained
   here first into <output_dir>/teacher) scores the auto pairs and keeps those with
   P_teacher(label) >= threshold (reward/vlm_eval.py); the decision is stored and reused on resume;
4. model: tiny random-init VLM, a local Qwen2.5-VL (`model.path`) or a trained reward model
   (`model.init_from`), in our format or the official one (`model.format`, reward/official.py), trainable
   parts by config; DeepSpeed engine (ZeRO stage by config, client AdamW, linear warmup);
5. resume from the latest (or a given) checkpoint: engine state + step + reader positions + RNG;
6. each step: auto-pool weight w_t of the curriculum, pool drawn per micro-batch (seeded by step),
   A and B of every pair scored in one forward, Rao-Kupper (or Bradley-Terry) NLL, DeepSpeed step;
7. log to stdout and TensorBoard (<output_dir>/tb), checkpoint every N steps (keep the last K),
   evaluate on the held-out split every N steps and at the end (<output_dir>/eval.json);
8. export the final model with `save_pretrained` to <output_dir>/model (format official: model_config.json +
   checkpoint-<step>/, the layout the GRPO presets' reward.vlm.path loads).
A resumed run yields the same losses and weights as an uninterrupted one (tests/test_reward_train.py).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from config import ConfigError
from config.cli import expected_errors, require_writable
from data.reader import require_intact
from data.tarindex import require_shards
from reward.losses import label_indices, pairwise_accuracy, preference_loss
from reward.official_format import OFFICIAL_CONFIG_FILE
from reward.train_config import parse_args, with_updates
from reward.train_engine import (
    MODEL_DIR,
    build_engine,
    build_model,
    export_model,
    load_checkpoint,
    resume_target,
    save_checkpoint,
    setup_distributed,
)
from reward.vlm import SETTINGS_FILE, load_trained_reward_model
from reward.vlm_data import (
    DataPlan,
    auto_weight,
    candidate_samples,
    choose_pool,
    eval_samples,
    make_pools,
    pair_inputs,
    plan_data,
)
from reward.vlm_eval import evaluate, teacher_filter, write_json
from runtime.cpu_bf16 import bf16_matmuls_in_fp32

# ----------------------------------------------------------------------------- teacher


def release_memory() -> None:
    """Free what a finished model left behind now: a destroyed DeepSpeed engine and a model still sit in
    reference cycles, which Python's collector, counting objects rather than bytes, may not visit for a long
    time; the teacher's model, gradients and optimizer state must not stay resident beside the main model's."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_teacher(cfg, plan: DataPlan, out: Path, rank: int, world: int) -> Optional[set]:
    """Kept auto-pair keys (None: filter off). Trains the teacher first when no checkpoint is given."""
    t = cfg.teacher
    if not t.enabled:
        return None
    result_file = out / "teacher_filter.json"
    if result_file.is_file():
        stored = json.loads(result_file.read_text())
        if (stored["threshold"], stored["tie_theta"]) != (t.threshold, cfg.trainer.tie_theta):
            raise ValueError(f"{result_file} was made with threshold {stored['threshold']}, tie_theta "
                             f"{stored['tie_theta']}; this run asks for {t.threshold}, {cfg.trainer.tie_theta}: "
                             "use another trainer.output_dir or delete the file")
        return set(stored["kept_keys"])
    checkpoint = t.checkpoint
    if checkpoint is None:
        teacher_out = out / "teacher"
        checkpoint = str(teacher_out / MODEL_DIR)
        if not any((Path(checkpoint) / marker).is_file() for marker in (SETTINGS_FILE, OFFICIAL_CONFIG_FILE)):
            teacher_cfg = with_updates(cfg, {"trainer.output_dir": str(teacher_out), "trainer.steps": t.train_steps,
                                             "teacher.enabled": False, "trainer.eval_every": 0},
                                       "teacher run (derived from the main config)")
            train(teacher_cfg, human_only=True)
            release_memory()  # the teacher's engine (cyclic references) before the filter and the main model
    base = cfg.model.path if cfg.model.init == "pretrained" else None  # a random-init teacher carries its base
    teacher = load_trained_reward_model(checkpoint, base, cfg.model.dtype, config_key="teacher.checkpoint")
    samples = candidate_samples(cfg.data, plan, list(t.sources), rank, world)
    result = teacher_filter(teacher, samples, t.threshold, cfg.trainer.tie_theta, t.batch_size)
    result["teacher"] = checkpoint
    if rank == 0:
        write_json(result_file, result)
        print(f"teacher filter: kept {result['num_kept']} of {result['num_candidates']} "
              f"{list(t.sources)} pairs ({result['kept_fraction']:.3f}) at P(label) >= {t.threshold}", flush=True)
    del teacher
    release_memory()
    dist.barrier()
    return set(result["kept_keys"])


# ----------------------------------------------------------------------------- training


def _eval_history(out: Path, step: int) -> List[Dict[str, Any]]:
    """Evaluations of earlier runs of this output_dir up to the resumed step (eval.json keeps them all)."""
    path = out / "eval.json"
    if step == 0 or not path.is_file():
        return []
    return [h for h in json.loads(path.read_text()).get("history", []) if h["step"] <= step]


def run_eval(cfg, engine, plan: DataPlan, rank: int, world: int) -> Dict[str, float]:
    samples = eval_samples(cfg.data, plan, rank, world)
    t = cfg.trainer
    return evaluate(engine.module, samples, t.tie_theta, t.loss, t.eval_batch_size, t.bt_ties)


def train_step(cfg, engine, pools, step: int, weight: float, available: Dict[str, int]):
    """One optimizer step (grad_accum micro-batches, each drawn whole from one pool): loss, accuracy, pools."""
    t = cfg.trainer
    loss_sum, acc_sum, drawn = 0.0, 0.0, []
    for micro in range(t.grad_accum):
        pool = choose_pool(step * t.grad_accum + micro, weight, t.seed, available)
        samples = pools[pool].take(t.batch_size)
        videos, refs, prompts, prefs = pair_inputs(samples)
        scores = engine(**engine.module.device_inputs(engine.module.inputs(videos, refs, prompts)))
        n = len(samples)  # scores: A of every pair, then B of every pair
        labels = label_indices(prefs, device=scores.device)
        loss = preference_loss(t.loss, scores[:n], scores[n:], labels, t.tie_theta, t.bt_ties)
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        loss_sum += loss.item()
        acc_sum += pairwise_accuracy(scores[:n], scores[n:], labels, t.tie_theta)["accuracy_with_ties"]
        drawn.append(pool)
    return loss_sum / t.grad_accum, acc_sum / t.grad_accum, drawn


def record_eval(out: Path, metrics: Dict[str, Any], history: List[Dict[str, Any]], extra: Dict[str, Any],
                writer, rank: int) -> None:
    """Append to the history, rewrite <output_dir>/eval.json, log to TensorBoard and stdout (rank 0)."""
    history.append(metrics)
    if rank != 0:
        return
    write_json(out / "eval.json", {**metrics, "history": history, **extra})
    if writer is not None:
        for name in ("accuracy_without_ties", "accuracy_with_ties", "loss"):
            writer.add_scalar(f"eval/{name}", metrics[name], metrics["step"])
    print(f"eval at step {metrics['step']}: {metrics}", flush=True)


def train(cfg, human_only: bool = False) -> Dict[str, Any]:
    """Run (or resume) training; returns {'losses': this run's per-step losses, 'eval': final metrics, ...}.

    The process group it joins (or makes, when no launcher did) is the process's: DeepSpeed caches its groups
    for the life of the process (deepspeed.utils.groups), so it cannot be destroyed and made again, and later
    calls in the same process reuse it. Whoever ends the process destroys it first (`main`, `end_process_group`):
    a group left to interpreter exit is torn down with gloo's native threads still running."""
    threads = torch.get_num_threads()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    try:
        with bf16_matmuls_in_fp32(cfg.trainer.device, cfg.model.dtype):  # AVX2 CPUs: runtime/cpu_bf16.py
            return _train(cfg, human_only)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (tests run several trainings in one process)


def end_process_group() -> None:
    """Destroy this process's group before the process exits (see `train`)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _train(cfg, human_only: bool) -> Dict[str, Any]:
    t = cfg.trainer
    rank, world = setup_distributed(t.device)
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    # data: label scan, held-out split, teacher filter, pools
    plan = plan_data(cfg.data)
    keep = None if human_only else run_teacher(cfg, plan, out, rank, world)
    pools = make_pools(cfg.data, plan, rank, world, keep, list(cfg.teacher.sources), human_only)
    sizes = plan.pool_sizes(keep, list(cfg.teacher.sources))
    extra = {"pool_sizes": sizes, "counts_by_source": plan.counts, "num_held_out": len(plan.held_out)}
    if rank == 0:
        print(f"{world} data-parallel rank(s); pairs by source {plan.counts}; held out {len(plan.held_out)}; "
              f"training pools {sizes}"
              + (" (human only: teacher run)" if human_only else ""), flush=True)

    # model, engine, resume
    engine = build_engine(cfg, build_model(cfg), world)
    target = resume_target(cfg, out)
    step = load_checkpoint(engine, target, pools, rank) if target else 0
    if target and rank == 0:
        print(f"resumed from {target[0]}/{target[1]} at step {step}", flush=True)
    writer = None
    if cfg.logging.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))

    try:
        return _loop(cfg, engine, plan, pools, extra, out, step, writer, rank, world)
    finally:
        if writer is not None:
            writer.close()  # also when stopped early: its thread must not outlive the run
        # DeepSpeed's own release: its optimizer's gradient hooks hold the engine, so without this a finished
        # run (the teacher's) stayed resident beside the next one (measured: 3.9 GiB in the reward_3b rehearsal).
        engine.destroy()


def _loop(cfg, engine, plan: DataPlan, pools, extra: Dict[str, Any], out: Path, step: int, writer, rank: int,
          world: int) -> Dict[str, Any]:
    t = cfg.trainer
    total = int(cfg.curriculum.steps or t.steps)
    available = {name: 1 for name in pools}
    losses: List[float] = []
    history = _eval_history(out, step)
    stop = min(t.steps, step + t.max_steps_per_run) if t.max_steps_per_run else t.steps
    engine.train()
    tick = time.time()
    while step < stop:
        c = cfg.curriculum
        w = auto_weight(step, c.schedule, c.auto_weight_start, c.auto_weight_end, total)
        loss, acc, drawn = train_step(cfg, engine, pools, step, w, available)
        step += 1
        losses.append(loss)
        if writer is not None:
            for name, value in (("loss", loss), ("batch_accuracy_with_ties", acc), ("auto_weight", w),
                                ("auto_fraction", drawn.count("auto") / len(drawn)), ("lr", engine.get_lr()[0])):
                writer.add_scalar(f"train/{name}", value, step)
        if rank == 0 and (step % t.log_every == 0 or step == stop):
            rate, tick = (time.time() - tick) / t.log_every, time.time()
            print(f"step {step}/{t.steps} loss {loss:.4f} pools {drawn} w_auto {w:.3f} "
                  f"lr {engine.get_lr()[0]:.2e} {rate:.2f}s/step", flush=True)
        if step % t.checkpoint_every == 0 or step == stop:
            save_checkpoint(engine, out, step, pools, rank, t.keep_last)
        if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
            record_eval(out, {"step": step, **run_eval(cfg, engine, plan, rank, world)}, history, extra, writer, rank)
            engine.train()
    if step < t.steps:  # stopped early by max_steps_per_run: the checkpoint is the result
        return {"losses": losses, "eval": None, "step": step, "model_dir": None}
    if not history or history[-1]["step"] != step:  # resumed at the last step: evaluate what was trained
        record_eval(out, {"step": step, **run_eval(cfg, engine, plan, rank, world)}, history, extra, writer, rank)
    export_model(engine, out / MODEL_DIR, t.zero_stage, rank, step)
    return {"losses": losses, "eval": history[-1], "step": step, "model_dir": str(out / MODEL_DIR)}


def preflight(cfg) -> None:
    """Paths checked before a process group or a model is built: shards exist, the output directory is writable,
    the resume target is a checkpoint. Raises ConfigError naming the key."""
    require_writable("trainer.output_dir", cfg.trainer.output_dir)
    require_shards(cfg, ["data.preference_shards", "data.eval_shards"])
    try:
        resume_target(cfg, Path(cfg.trainer.output_dir))
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    require_intact(cfg, {"data.preference_shards": "preference", "data.eval_shards": "preference"}, cfg.data.on_error)


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_args(argv, description=__doc__.splitlines()[0])
    with expected_errors("reward.train"):  # config, paths, shards, checkpoints: one line, exit 2 (config/cli.py)
        preflight(cfg)
        try:
            train(cfg)
        finally:
            end_process_group()


if __name__ == "__main__":
    main()
