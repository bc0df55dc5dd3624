"""What can be checked before a cluster starts, so that a wrong path costs seconds, not a Ray start-up and a
traceback from inside a worker on a GPU node: the weights every role will load, the prompt shards, the output
directory (and where a `ray job submit` job would write it), and the resume target.

Every failure is a ConfigError whose message names the config key and the path; `launcher.train` turns it into
one line and exit 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

from config import RESUME_KEYS, ConfigError, stored_config_mismatches
from config.cli import require_writable
from data.reader import require_intact
from data.tarindex import require_shards
from runtime.checkpoint import CheckpointManager

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted job's entrypoint


def weight_files(cfg) -> List[Path]:
    """Every weight directory and file the policy (rollout, learner) and the reward workers will read, checked
    for presence, layout and the architecture the config names, without loading any of them."""
    from policy.locate import policy_files
    from reward.locate import reward_files

    try:
        return policy_files(cfg.model) + reward_files(cfg.reward)
    except (FileNotFoundError, ValueError, NotImplementedError) as err:  # NotImplemented: an unsupported official file
        raise ConfigError(str(err)) from None


def check_output_dir(cfg) -> None:
    """Writable; and absolute in a submitted Ray job, whose working directory is an uploaded copy of the
    submitter's on the head node (Ray deletes it with the job): a relative output directory would put every
    checkpoint there, out of reach of a later `--checkpoint latest` and of every other node."""
    out = cfg.trainer.output_dir
    if os.environ.get(RAY_JOB_ENV) is not None and not os.path.isabs(out):
        raise ConfigError(f"'trainer.output_dir' {out} is relative, and this is a Ray job: it would resolve inside "
                          f"the job's uploaded working directory on the head node ({os.getcwd()}), not in your "
                          "checkout, and other nodes could not see it; give an absolute path on storage every "
                          f"node shares, e.g. trainer.output_dir=/shared/runs/{Path(out).name}")
    require_writable("trainer.output_dir", out)


def check_resume(cfg) -> None:
    """The resume target (or the `latest` pointer) is a complete checkpoint written with this config's shape
    keys (RESUME_KEYS)."""
    try:
        resume = CheckpointManager(cfg.trainer.output_dir, cfg.trainer.keep_last).resolve(cfg.trainer.resume)
    except FileNotFoundError as err:
        raise ConfigError(f"'trainer.resume' {cfg.trainer.resume}: {err}") from None
    if resume is not None and (resume / "config.yaml").is_file():
        differ = stored_config_mismatches(resume / "config.yaml", cfg, RESUME_KEYS)
        if differ:
            raise ConfigError(f"'trainer.resume' {resume} was written with " + ", ".join(
                f"{key}={theirs!r} (this config: {mine!r})" for key, theirs, mine in differ) +
                "; resume with those values, or start elsewhere (trainer.output_dir) or anew (trainer.resume=never)")


def preflight(cfg) -> None:
    """All of the above, cheapest first. Raises ConfigError naming the key (DataError for a damaged shard)."""
    check_output_dir(cfg)
    check_resume(cfg)
    shard_keys = ["data.prompt_shards"] + ["data.eval_prompt_shards"] * bool(cfg.logging.eval_every)
    require_shards(cfg, shard_keys)
    weight_files(cfg)
    require_intact(cfg, dict.fromkeys(shard_keys, "prompt"), cfg.data.on_error)  # reads every shard: last
