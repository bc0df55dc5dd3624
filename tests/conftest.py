"""Shared fixtures. Tests build tiny models from configs; nothing is downloaded."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two intra-op threads on the 2-core machines, unless OMP_NUM_THREADS says otherwise: CI runs two suites at once
# and sets it to 1 (an intra-op thread waiting for a descheduled sibling stalled small ops up to 7x there).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running_at_exit():
    """Fails the session if it leaves a process group, a Ray driver or worker threads to interpreter exit,
    where their teardown crashed the process after all tests passed (issue #14; tests/leak_guard.py)."""
    yield
    from tests.leak_guard import leftovers

    found = leftovers()
    assert not found, "the test session leaves running at exit: " + "; ".join(found)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are many small ops: one intra-op thread is as fast alone and much steadier on
    shared, busy cores. Restores the thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
