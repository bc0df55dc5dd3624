"""Identity-GRPO training driver (single controller).

    python -m launcher.train --config cluster_configs/local_cpu.yaml [key.sub=value ...] [--print-config]

The algorithm, one step:
    prompts    P prompt samples (text + one reference photo per person) from the WebDataset stream
    rollouts   each prompt -> a group of G videos from the policy, with per-step log-probs
    rewards    reward workers score the videos (object refs go worker to worker, not via the driver)
    advantages group-normalised rewards (policy/grpo.py)
    update     DeepSpeed learner ranks apply the clipped-ratio GRPO loss + KL to the reference
    sync       the new policy version's weights go to the rollout workers
    log, checkpoint
Sync mode is on-policy. Async mode launches the next step's rollouts before the update, with the
weights of the version before it (staleness 1, bounded by trainer.max_staleness); the importance ratio
against the recorded rollout log-probs corrects for it. A dead rollout or reward worker is restarted
by Ray and its call re-run with the same seeds and version; a dead learner rank makes the driver
restart the learner group and roll the whole run back to the last checkpoint.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from config import to_yaml
from config.cli import expected_errors, parse_config
from data.reader import ShardReader
from evaluation.held_out import eval_seeds, load_prompts
from launcher.cluster import (Workers, build_workers, context_leaders, learner_shares, restart_learner,
                              restart_rollouts, rollout_gang_failure, start_learner, stop_ray)
from launcher.preflight import preflight
from launcher.progress import Progress
from launcher.step_metrics import StepTimer, reduce_learner_stats, step_record
from policy.grpo import group_advantages
from policy.policy import guided_passes
from policy.window import sde_steps
from runtime.checkpoint import CheckpointManager
from runtime.metrics import MetricsLogger
from workers.common import maybe_fault, sample_seed
from workers.group import Strided
from workers.update_plan import transformer_passes
from workers.ray_cluster import RESTARTABLE, connect_ray
from workers.run_config import load_run_config
from workers.weight_sync import WeightSync, sync_mode

log = logging.getLogger("identity_grpo")


@dataclass
class Rollouts:
    """One step's rollouts in flight: a trajectory ref per prompt group, their pending scores, and the prompt
    stream's position after this step's prompts."""

    trajectories: List[ray.ObjectRef]
    scores: Strided
    reader_state: dict


@dataclass
class RunState:
    """Everything the driver needs to continue a run exactly (saved in every checkpoint)."""

    step: int = 0  # last completed step
    version: int = 0  # policy version the learner holds
    reader: Optional[dict] = None  # prompt stream position after the last completed step's prompts
    weights: Dict[int, object] = field(default_factory=dict)  # version -> ref of its published weights
    resume_rollout_version: Optional[int] = None  # async resume: the in-flight step's (older) version


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.out = Path(cfg.trainer.output_dir)
        self.checkpoints = CheckpointManager(self.out, cfg.trainer.keep_last)
        self.started_ray = connect_ray(cfg)
        self.workers: Workers = build_workers(cfg)
        # Full weights go by broadcast (a group of learner rank 0 + rollout workers, built on the first
        # publish and rebuilt whenever a member is new); LoRA through the object store (workers.weight_sync).
        self.weight_sync = (WeightSync(self.workers, cfg.workers.weight_sync_timeout_s)
                            if sync_mode(cfg) == "broadcast" else None)
        # what a learner failure rolls back to: the checkpoint this run started from or last wrote (not the
        # directory's `latest`, which may be another run's when trainer.resume=never)
        self.last_checkpoint = self.checkpoints.resolve(cfg.trainer.resume)
        self.learner_restarts = self.rollout_restarts = 0
        # what a video costs: passes per sampled step (rollout_nfe is measured: policy/ode.py may skip steps) and
        # passes to learn from it (fixed by the config)
        self.passes_per_step = guided_passes(cfg.model.kind, cfg.sampler)
        self.learn_passes = transformer_passes(cfg)["learn_passes"]
        self.state = self.start_learning()
        self.metrics = MetricsLogger(self.out, cfg.logging.tensorboard, resume_step=self.state.step)
        self.stop_requested = False
        self.eval_prompts = (load_prompts(cfg.data.eval_prompt_shards, cfg.logging.eval_num_prompts, cfg.data.on_error)
                             if cfg.logging.eval_every else [])
        self.eval_seeds = eval_seeds(cfg.trainer.seed, cfg.logging.eval_seeds_per_prompt)

    def start_learning(self) -> RunState:
        """The learner group up and the run restored (from the checkpoint, or fresh). A learner rank that dies
        meanwhile (in the rendezvous, the engine's set-up, the checkpoint's load) gets the loop's recovery: a gang
        restart and the restore again."""
        try:
            start_learner(self.workers.learner)
            return self.restore(self.last_checkpoint)
        except RayActorError as err:
            if not self.is_learner_failure(err):
                raise
            log.warning("learner rank died while starting (%s); restarting the learner group", err)
            self.recover_learner()
            return self.state

    def request_stop(self, signum=None, frame=None) -> None:
        """SIGTERM/SIGUSR1 (Slurm preemption, scancel, requeue): checkpoint after the current step, exit."""
        log.warning("signal %s: will checkpoint after the current step and stop", signum)
        self.stop_requested = True

    # ------------------------------------------------------------------ the loop

    def train(self) -> RunState:
        cfg = self.cfg
        progress = Progress(cfg.trainer.steps, self.state.step, enabled=cfg.logging.progress_bar)
        next_rollouts = None  # async mode: the next step's rollouts, already running
        while self.state.step < cfg.trainer.steps:
            step, timer = self.state.step + 1, StepTimer()
            try:
                # 1-2. prompts -> rollouts (refs), their scoring queued right behind them
                rollouts = next_rollouts or self.launch_rollouts(step, self.rollout_version())
                next_rollouts = None
                # 3. rewards: the reward workers read the trajectories straight from the rollout workers
                with timer("reward_s"):
                    scored = rollouts.scores.get()
                # 4. advantages within each prompt group
                totals = torch.stack([s["scores"]["total"] for s in scored])
                adv = group_advantages(totals, cfg.grpo.std_mode, cfg.grpo.adv_eps, cfg.grpo.adv_clip,
                                       cfg.grpo.std_ddof)
                # async: start the next step's rollouts now, with the current weights
                if cfg.trainer.mode == "async" and cfg.trainer.max_staleness >= 1 and step < cfg.trainer.steps:
                    next_rollouts = self.launch_rollouts(step + 1, self.state.version)
                staleness = self.check_staleness(scored)
                # 5. GRPO update on the learner ranks
                with timer("learn_s"):
                    learner = self.update(step, rollouts.trajectories, adv)
                # 6. sync: publish the new version to the rollout workers
                with timer("sync_s"):
                    self.state.version += 1
                    self.publish_weights()
                self.state.step, self.state.reader = step, rollouts.reader_state
                # 7. log, held-out monitor, checkpoint
                record = step_record(step=step, scored=scored, advantages=adv, learner=learner, staleness=staleness,
                                     timer=timer, policy_version=self.state.version,
                                     data_skipped=self.prompts.num_skipped, passes_per_step=self.passes_per_step,
                                     learn_passes=self.learn_passes)
                if self.eval_prompts and step % cfg.logging.eval_every == 0:
                    record.update(self.held_out_monitor())
                self.metrics.log(record)
                if cfg.logging.video_every and step % cfg.logging.video_every == 0:
                    traj = ray.get(rollouts.trajectories[0])
                    self.metrics.log_videos(step, traj.videos, traj.references)
                if step % cfg.trainer.checkpoint_every == 0 or step == cfg.trainer.steps or self.stop_requested:
                    self.save_checkpoint(step, next_rollouts)
            except (RayActorError, RayTaskError) as err:
                # A rollout or reward worker that dies is restarted by Ray, which re-runs its call; a learner
                # rank that dies in any phase (update, publish, monitor, checkpoint, or idle before its next
                # call) fails the whole collective group: restart it and replay from the last checkpoint. So does
                # an actor of a context-parallel rollout worker (its peers' collectives fail with it).
                if rollout_gang_failure(self.workers, err):
                    log.warning("a context-parallel rollout worker failed (%s); restarting the rollout workers from "
                                "the last checkpoint", err)
                    next_rollouts = self.recover_rollouts()
                    continue
                if not isinstance(err, RayActorError) or not self.is_learner_failure(err):
                    raise
                log.warning("learner rank died (%s); restarting the learner group from the last checkpoint", err)
                next_rollouts = self.recover_learner()
                continue
            progress.update(step, record)
            if self.stop_requested:
                log.warning("stopped at step %d on request; resume with trainer.resume=auto", step)
                break
        progress.close()
        return self.state

    # ------------------------------------------------------------------ phases

    def rollout_version(self) -> int:
        """The policy version the next rollouts sample with: the learner's, except for the first step after an
        async resume, whose rollouts were in flight with the version before."""
        version, self.state.resume_rollout_version = self.state.resume_rollout_version, None
        return self.state.version if version is None else version

    def launch_rollouts(self, step: int, version: int) -> Rollouts:
        """Read P prompts, start one rollout per prompt group (round robin over the rollout workers) and queue its
        scoring right behind it (strided over the reward workers), with the not-yet-ready trajectory refs as
        arguments: Ray runs it as soon as each rollout finishes, so in async mode the next step's rewards are
        computed while the learner trains on this step."""
        cfg = self.cfg
        stream = self._stream()
        samples = [next(stream) for _ in range(cfg.grpo.prompts_per_step)]
        reader_state = self.prompts.state_dict()
        weights_box = [self.state.weights[version]]
        # the SDE window at this step (policy/window.py): a function of the step, so replays see the same one;
        # the NFT objective (policy/nft.py) learns from deterministic rollouts' final latents
        window = sde_steps(cfg.sampler.sde_window, cfg.sampler.num_steps, step, cfg.trainer.seed)
        calls = [(step, _light(sample), [sample_seed(cfg.trainer.seed, step, g, i) for i in range(cfg.grpo.group_size)],
                  version, weights_box) for g, sample in enumerate(samples)]
        trajectories = self.workers.rollout.round_robin("generate", calls, sde_steps=window,
                                                        deterministic=cfg.grpo.objective == "nft")
        return Rollouts(trajectories, self.workers.reward.strided("score", trajectories, step), reader_state)

    def check_staleness(self, scored: List[dict]) -> List[int]:
        """Versions each group's rollout lags the learner by; over `trainer.max_staleness` is a bug, not data."""
        staleness = [self.state.version - s["policy_version"] for s in scored]
        if max(staleness) > self.cfg.trainer.max_staleness:
            raise AssertionError(f"trajectory staleness {max(staleness)} exceeds "
                                 f"trainer.max_staleness={self.cfg.trainer.max_staleness}")
        return staleness

    def update(self, step: int, trajectories: List, adv) -> Dict[str, float]:
        shares = learner_shares(len(trajectories), self.cfg)  # a context group's ranks train on the same share
        calls = [(step, ids, [adv.values[i] for i in ids], [adv.mask[i] for i in ids],
                  *[trajectories[i] for i in ids]) for ids in shares]
        return reduce_learner_stats(context_leaders(ray.get(self.workers.learner.run_split("update", calls)), self.cfg))

    def publish_weights(self) -> None:
        """Learner -> every rollout worker, by broadcast or through the object store. Either way the driver
        keeps a ref per version to its weights in the object store (for a restarted worker's re-queued
        rollout and async checkpoints); older versions beyond the staleness bound go."""
        version = self.state.version
        if self.weight_sync is not None:
            # Waits for the workers' queued rollouts, then broadcasts; a failure is retried once on a
            # rebuilt group. The returned ref is rank 0's recovery copy, fetched by nobody healthy.
            self.state.weights[version] = self.weight_sync.publish(version)
        else:
            published = self.workers.learner.run("publish", version)
            ray.get([done for done, _ in published])  # a rank that died publishing raises here
            copy = self.state.weights[version] = published[0][1]
            # Not awaited: an actor runs a caller's calls in order, so the next rollout on each worker comes
            # after this install (and carries the version's weights ref anyway). The previous round's
            # installs are collected here, which surfaces their errors.
            ray.get(getattr(self, "_installs", []))
            self._installs = self.workers.rollout.run("set_weights", version, copy)
        for old in [v for v in self.state.weights if v < version - max(1, self.cfg.trainer.max_staleness)]:
            del self.state.weights[old]

    def held_out_monitor(self) -> Dict[str, float]:
        """Held-out prompts scored with rewards the policy is not trained on (evaluation/held_out.py), by rollout
        worker 0 (all its actors when context-parallel) with the current version (a worker Ray restarts mid-call
        fetches it, so the numbers do not change), or with the EMA weights when there is an EMA (official: evaluation
        swaps the EMA in)."""
        timer = StepTimer()
        version = self.state.version
        ema = self.workers.learner.actors[0].ema_weights.remote() if self.cfg.optim.ema.enabled else None
        out = ray.get(self.workers.rollout.run_unit(0, "held_out", self.eval_prompts, self.eval_seeds, version,
                                                    [self.state.weights[version]], ema))
        return {**out, "eval_s": timer.elapsed()}

    # ------------------------------------------------------------------ checkpoints and recovery

    def save_checkpoint(self, step: int, inflight) -> None:
        cfg = self.cfg
        inflight_version = None
        if inflight is not None:  # async: the next step's rollouts use an older version: keep its weights
            inflight_version = self.state.version - 1
        driver_state = {
            "step": step, "version": self.state.version, "reader": self.state.reader,
            "inflight_version": inflight_version,
            "inflight_weights": ray.get(self.state.weights[inflight_version]) if inflight_version is not None else None,
            "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
        }

        def write_parts(tmp: Path) -> None:
            ray.get(self.workers.learner.run("save", str(tmp)))

        self.last_checkpoint = self.checkpoints.save(step, write_parts, driver_state, to_yaml(cfg),
                                                     before_commit=lambda: maybe_fault(cfg, "checkpoint", 0, step))

    def restore(self, path: Optional[Path]) -> RunState:
        """Learner weights and optimizer, reader position and step from a checkpoint (or a fresh start)."""
        state = RunState()
        if path is not None:
            saved = CheckpointManager.load_driver_state(path)
            ray.get(self.workers.learner.run("load", str(path)))
            state = RunState(step=saved["step"], version=saved["version"], reader=saved["reader"])
            if saved.get("inflight_version") is not None:
                state.weights[saved["inflight_version"]] = ray.put(saved["inflight_weights"])
                state.resume_rollout_version = saved["inflight_version"]
            torch.set_rng_state(saved["torch_rng"])
            np.random.set_state(saved["numpy_rng"])
            log.info("resumed from %s (step %d, policy version %d)", path, state.step, state.version)
        self.prompts = ShardReader.from_config(self.cfg.data, "prompt")
        if state.reader is not None:
            self.prompts.load_state_dict(state.reader)
        self._iter = None
        self.state = state
        self.publish_weights()  # rollout workers get the restored weights before the first rollout
        return state

    def recover_learner(self):
        """Gang-restart the learner group and roll back to the last checkpoint. (Broadcast sync: the new
        learner rank 0 is in no weight group yet, so the publish in restore() rebuilds the group.) A rank
        that dies during the recovery itself starts it over; `trainer.max_learner_restarts` bounds the
        restarts of a run, so a learner that dies every time (out of memory, a bad node) stops the run."""
        while True:
            self.learner_restarts += 1
            if self.learner_restarts > self.cfg.trainer.max_learner_restarts:
                raise RuntimeError(f"the learner group died {self.learner_restarts} times, more than "
                                   f"'trainer.max_learner_restarts' ({self.cfg.trainer.max_learner_restarts}); "
                                   "see the learner ranks' logs for the cause")
            try:
                restart_learner(self.workers.learner)
                self.state = self.restore(self.last_checkpoint)
                break
            except RayActorError as err:
                if not self.is_learner_failure(err):
                    raise
                log.warning("learner rank died while recovering (%s); restarting again", err)
        if getattr(self, "metrics", None) is not None:  # None while starting: nothing logged yet
            self.metrics.truncate_after(self.state.step)
        return None

    def recover_rollouts(self):
        """Gang-restart the context-parallel rollout workers (fresh actors in new context groups) and roll back to
        the last checkpoint; without one the run starts over, with the learner group restarted too (its weights must
        be the initial ones). Bounded as a rollout worker's Ray restarts are."""
        self.rollout_restarts += 1
        if self.rollout_restarts > RESTARTABLE["max_restarts"]:
            raise RuntimeError(f"the context-parallel rollout workers failed {self.rollout_restarts} times; see their "
                               "logs for the cause")
        restart_rollouts(self.workers.rollout)
        if self.last_checkpoint is None:
            return self.recover_learner()
        self.state = self.restore(self.last_checkpoint)
        self.metrics.truncate_after(self.state.step)
        return None

    def is_learner_failure(self, err: RayActorError) -> bool:
        learner_ids = {a._actor_id.hex() for a in self.workers.learner.actors}
        return getattr(err, "actor_id", None) in learner_ids or "LearnerWorker" in str(err)

    # ------------------------------------------------------------------ helpers

    def _stream(self):
        if getattr(self, "_iter", None) is None:
            self._iter = iter(self.prompts)
        return self._iter

    def close(self) -> None:
        self.metrics.close()
        stop_ray(self.started_ray, self.workers)


def _light(sample: dict) -> dict:
    """What a rollout needs of a prompt sample."""
    return {"key": sample["key"], "prompt": sample["prompt"], "refs": list(sample["refs"])}


def run(cfg, handle_signals: bool = False) -> Trainer:
    """Build the workers, train, and always release them; returns the finished trainer."""
    trainer = Trainer(cfg)
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, trainer.request_stop)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def main(argv: Optional[Sequence[str]] = None) -> RunState:
    cfg, _ = parse_config(__doc__, argv, loader=load_run_config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with expected_errors("train"):  # config, paths, shards, checkpoints: one line, exit 2 (config/cli.py)
        preflight(cfg)
        trainer = run(cfg, handle_signals=True)
    state = trainer.state
    if trainer.stop_requested and state.step < cfg.trainer.steps:
        log.warning("interrupted at step %d of %d (checkpoint saved)", state.step, cfg.trainer.steps)
        raise SystemExit(143)  # 128 + SIGTERM: a scheduler sees an interrupted job, not a finished one
    log.info("done: %d steps, policy version %d; outputs in %s", state.step, state.version, cfg.trainer.output_dir)
    return state


if __name__ == "__main__":
    main()
