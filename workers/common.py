"""What every worker shares: rebuilding the config, seeding, and deliberate faults for tests."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from config import config_from_yaml_text
from config.checks import parse_kill

log = logging.getLogger(__name__)


def worker_config(cfg_yaml: str):
    """Workers get the resolved config as YAML text (plain data travels through Ray without surprises)."""
    torch.set_num_threads(1)  # colocated actors share the cores; one thread each avoids oversubscription
    return config_from_yaml_text(cfg_yaml)


def sample_seed(base_seed: int, step: int, group: int, member: int) -> int:
    """A well-mixed 63-bit seed per (run seed, step, prompt group, group member).

    A sample's noise depends on this seed alone, so a re-queued rollout reproduces the lost one
    exactly and different members never share noise.
    """
    return int(np.random.SeedSequence([base_seed, step, group, member]).generate_state(2, np.uint64)[0] >> 1)


def maybe_fault(cfg, role: str, rank: int, step: int) -> None:
    """Kill this process once if a `faults.kills` entry names (role, rank, step) (a marker file makes it once)."""
    if (role, rank, step) not in [parse_kill(entry) for entry in cfg.faults.kills]:
        return
    marker = Path(cfg.trainer.output_dir) / "faults" / f"{role}_{rank}_step{step}.done"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed pid {os.getpid()}\n")
    log.warning("faults: killing %s rank %d at step %d (pid %d)", role, rank, step, os.getpid())
    os._exit(1)


def published_weights(module: torch.nn.Module, lora: bool) -> Dict[str, torch.Tensor]:
    """What a policy version is made of: the LoRA adapters in peft format, or a CPU copy of the full state."""
    from policy.lora import lora_state_dict

    if lora:
        return lora_state_dict(module)
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class WorkerBase:
    """Rank bookkeeping and a few introspection calls every actor answers."""

    def __init__(self, rank: int, world_size: int, cfg_yaml: str):
        self.rank, self.world_size = rank, world_size
        self.cfg = worker_config(cfg_yaml)
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {type(self).__name__}[{rank}] %(message)s")

    def rendezvous(self) -> tuple:
        """This node's address and a free port on it (a process group's: the DeepSpeed engine's, a rollout context
        group's, or a weight group's store)."""
        import ray

        from runtime.distributed import free_port

        return ray.util.get_node_ip_address(), free_port()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def memory_modules(self) -> Dict[str, torch.nn.Module]:
        """The models this worker holds, by name (each role says)."""
        return {}

    def memory_report(self) -> Dict[str, object]:
        """This process's peak and current resident memory, and the bytes of the models it holds (by part):
        what `launcher.rehearse` compares with bench/MEMORY_PLAN.md's formula."""
        import resource

        import psutil

        parts = {name: tensor_bytes(module) for name, module in self.memory_modules().items() if module is not None}
        return {"role": type(self).__name__.replace("Worker", "").lower(), "rank": self.rank, "pid": os.getpid(),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "rss_bytes": psutil.Process().memory_info().rss, "param_bytes": sum(parts.values()), "parts": parts}


def tensor_bytes(obj) -> int:
    """Bytes of a module's parameters and buffers (shared storage counted once), or of a dict/list of tensors."""
    seen, total = set(), 0
    if isinstance(obj, torch.nn.Module):
        tensors = list(obj.parameters()) + list(obj.buffers())
    elif isinstance(obj, dict):
        tensors = [t for v in obj.values() for t in ([v] if torch.is_tensor(v) else
                                                      (v.values() if isinstance(v, dict) else []))
                   if torch.is_tensor(t)]
    else:
        tensors = [t for t in obj if torch.is_tensor(t)]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.numel() else 0
    return total
