"""Run a function in a fresh spawned Python process and return its result.

Why: a torch.distributed process group belongs to the process that made it. DeepSpeed caches its groups
in module globals for the life of the process (deepspeed.utils.groups._WORLD_GROUP and friends), so a
group cannot be destroyed and made again in one process, and a group left alive in the pytest process is
torn down at interpreter exit, with gloo's native threads still running (tests/conftest.py's session guard
refuses that). So every test that needs a DeepSpeed engine or a process group outside Ray runs it here.
"""

import multiprocessing


def in_fresh_process(fn, *args):
    """`fn(*args)` in a spawned child (fn must be importable: a module-level function)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)
