"""A run's config as its workers will build it: config/'s pure checks, then the ones only the model rooms can
answer (policy/checks.py: architectures, noise rule; reward/checks.py: the reward registry, VLM architectures).

Every entry point that starts a run, evaluates a policy or samples with one loads its config here, so a name the
code cannot build is one line naming the key before anything starts, not a traceback inside a Ray actor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from config import load_config
from policy.checks import check_policy_config
from reward.checks import check_reward_config

MODEL_CHECKS = (check_policy_config, check_reward_config)


def load_run_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()):
    """`config.load_config` with the model rooms' checks (a ConfigError names the key and the file or override)."""
    return load_config(path, overrides, checks=MODEL_CHECKS)
