"""Check a preset on this node before any GPU is spent on it, and print its launch plan. Starts nothing.

    python -m launcher.doctor --config cluster_configs/vace_1.3b_8gpu.yaml [key=value ...]

Each check prints `ok` or `FAIL` with the culprit (the config key and path), and every check runs even after one
fails, so one call lists everything to fix:

    weights   every directory and file the roles will load, in its layout, of the architecture the preset names
              (launcher/preflight.py: the same checks `launcher.train` runs before Ray starts)
    data      the prompt shards (and the held-out shards, when the monitor is on) exist
    output    trainer.output_dir is writable; absolute and on a shared file system when the roles span nodes
    resume    trainer.resume (or the `latest` pointer) is a complete checkpoint written with this config's shapes
    device    trainer.device=cuda: torch sees CUDA, this node has the GPUs a single-node preset asks for, NCCL is
              available, and the GPUs compute in the model's dtype

Then the plan: per role the processes, GPUs and CPUs each, the node resource it is pinned to, and the host memory
each process is planned to hold (launcher/memory_plan.py, from the named architectures). Exit 0 when every check
passes, else 1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from config import ConfigError
from config.checks import RANDOM_POLICY, RANDOM_REWARD_MODEL
from config.cli import parse_config
from data.tarindex import require_shards
from launcher.preflight import check_output_dir, check_resume, weight_files
from workers.run_config import load_run_config

POOLS = ("rollout", "reward", "learner")
# File systems every node of a cluster can mount the same way (a checkpoint written by one is read by another).
SHARED_FS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "glusterfs", "fuse.glusterfs", "wekafs",
             "fuse.juicefs", "fuse.s3fs", "fuse.gcsfuse", "fuse.mountpoint-s3", "virtiofs", "9p"}


def spans_nodes(cfg) -> bool:
    """Pools pinned to node resources (`workers.<pool>.node_resource`): the roles run on several nodes."""
    return any(cfg.workers[p].node_resource for p in POOLS)


def mount_of(path: str, mounts_file: str = "/proc/mounts") -> Tuple[str, str]:
    """(mount point, file system type) holding `path` (or its nearest existing parent)."""
    target = Path(path).resolve()
    best = ("/", "unknown")
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == Path(point) or Path(point) in target.parents) and len(point) >= len(best[0]):
            best = (point, fields[2])
    return best


def check_shared_output(cfg) -> str:
    out = cfg.trainer.output_dir
    if not spans_nodes(cfg):
        return f"{out} (one node)"
    if not os.path.isabs(out):
        raise ConfigError(f"'trainer.output_dir' {out} is relative, and the roles span nodes: give an absolute path "
                          "on storage every node shares")
    point, fs = mount_of(out)
    if fs not in SHARED_FS:
        raise ConfigError(f"'trainer.output_dir' {out} is on {fs} ({point}), local to this node, and the roles span "
                          f"nodes: the learner ranks on other nodes write their checkpoint parts there; use shared "
                          f"storage ({', '.join(sorted(SHARED_FS)[:6])}, ...)")
    return f"{out} ({fs} at {point}, shared)"


def gpus_needed_here(cfg) -> Optional[int]:
    """GPUs a single-node preset needs on this node (None when the roles span nodes: each node hosts a part)."""
    if spans_nodes(cfg):
        return None
    w = cfg.workers
    if w.colocate:
        return int(max(w[p].num_workers for p in POOLS) * max(w[p].num_gpus_per_worker for p in POOLS) + 0.999)
    return int(sum(w[p].num_workers * w[p].num_gpus_per_worker for p in POOLS) + 0.999)


def check_device(cfg) -> str:
    if cfg.trainer.device != "cuda":
        return f"trainer.device={cfg.trainer.device}: no GPU checks"
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"trainer.device=cuda, but torch {torch.__version__} sees no CUDA GPU (its CUDA build: "
                          f"{torch.version.cuda}); a GPU node with a CUDA build of torch is needed")
    have, need = torch.cuda.device_count(), gpus_needed_here(cfg)
    if need is not None and have < need:
        raise ConfigError(f"the workers.* pools ask for {need} GPUs on this node; it has {have}")
    if not torch.distributed.is_nccl_available():
        raise ConfigError("torch.distributed has no NCCL: the learner ranks and the weight broadcast need it")
    if cfg.model.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"model.dtype=bfloat16, but {torch.cuda.get_device_name(0)} has no bf16")
    return f"{have} x {torch.cuda.get_device_name(0)}, NCCL, {cfg.model.dtype}"


def run_checks(cfg) -> List[Tuple[str, bool, str]]:
    data_keys = ["data.prompt_shards"] + ["data.eval_prompt_shards"] * bool(cfg.logging.eval_every)
    checks: List[Tuple[str, Callable[[], str]]] = [
        ("weights", lambda: ", ".join(str(p) for p in weight_files(cfg)) or "random init: none to read"),
        ("data", lambda: require_shards(cfg, data_keys) or ", ".join(str(OmegaConf.select(cfg, k)) for k in data_keys)),
        ("output", lambda: check_output_dir(cfg) or check_shared_output(cfg)),
        ("resume", lambda: check_resume(cfg) or f"trainer.resume={cfg.trainer.resume}"),
        ("device", lambda: check_device(cfg)),
    ]
    results = []
    for name, check in checks:
        try:
            results.append((name, True, check()))
        except ConfigError as err:
            results.append((name, False, str(err)))
    return results


def plan_rows(cfg, config_path: Optional[str], overrides: Sequence[str]) -> List[dict]:
    """Per role: processes, GPUs and CPUs each, node resource, planned host memory per process (None: no arch)."""
    from launcher.memory_plan import GiB, model_bytes, predict

    memory = {}
    if cfg.model.arch:  # the named architectures' sizes, built on the meta device (no weights read)
        try:
            planning = load_run_config(config_path, [*overrides, *RANDOM_POLICY, *RANDOM_REWARD_MODEL])
        except ConfigError:  # e.g. no reward.vlm.arch to size the reward model by: no memory column
            planning = None
        if planning is not None:
            memory = {role: terms["total"] / GiB for role, terms in predict(planning, model_bytes(planning)).items()}
    w = cfg.workers
    return [{"role": p, "processes": w[p].num_workers, "gpus_each": w[p].num_gpus_per_worker,
             "cpus_each": w[p].num_cpus_per_worker, "node_resource": w[p].node_resource or "-",
             "host_gib_each": memory.get(p)} for p in POOLS]


def print_plan(cfg, rows: List[dict]) -> None:
    w = cfg.workers
    layout = "colocated (one of each role per GPU slot)" if w.colocate else "split pools"
    print(f"plan: {layout}; learner ZeRO-{w.learner_engine.zero_stage} {w.learner_engine.precision}, weight sync "
          f"{w.weight_sync}; {cfg.trainer.steps} steps of {cfg.grpo.prompts_per_step} prompts x {cfg.grpo.group_size}"
          f" videos at {cfg.model.height}x{cfg.model.width}x{cfg.model.num_frames}")
    print(f"  {'role':<9}{'processes':>10}{'GPUs each':>11}{'CPUs each':>11}  {'node resource':<16}"
          f"{'host GiB each':>14}")
    for r in rows:
        mem = "-" if r["host_gib_each"] is None else f"{r['host_gib_each']:.1f}"
        print(f"  {r['role']:<9}{r['processes']:>10}{r['gpus_each']:>11g}{r['cpus_each']:>11g}  "
              f"{r['node_resource']:<16}{mem:>14}")
    need = gpus_needed_here(cfg)
    print(f"  GPUs on one node: {need}" if need is not None else
          "  nodes: one per node resource above (Slurm: cluster_configs/slurm/train_multinode.sbatch NODE_ROLES)")
    # launcher.evaluate --num-workers: each worker holds the policy and the scorer (the rollout's and the reward's)
    by_role = {r["role"]: r for r in rows}
    memory = [by_role[p]["host_gib_each"] for p in ("rollout", "reward")]
    mem = "" if None in memory else f", about {sum(memory):.1f} host GiB"
    print(f"  evaluation (make eval WORKERS={need or 'N'}, cluster_configs/slurm/evaluate.sbatch): one process per "
          f"GPU, {w.rollout.num_gpus_per_worker:g} GPU and {w.rollout.num_cpus_per_worker:g} CPUs each{mem}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg, args = parse_config(__doc__, argv, loader=load_run_config, command="doctor")
    results = run_checks(cfg)
    for name, ok, detail in results:
        print(f"{name:<8}{'ok  ' if ok else 'FAIL'}  {detail}")
    print_plan(cfg, plan_rows(cfg, args.config, args.overrides))
    failed = [name for name, ok, _ in results if not ok]
    print(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}" if failed else "doctor: every check passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
