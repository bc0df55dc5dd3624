"""The config keys only the reward room can check: the names in `reward.weights` (the registry: what can be built
is what may be named) and `reward.vlm.arch`. Run after config/checks.py's pure checks by workers/run_config.py;
a failure is a ConfigError naming the key and the source."""

from __future__ import annotations

from config import ConfigError


def check_reward_config(cfg, source: str) -> None:
    from reward.composite import REWARD_BUILDERS
    from reward.vlm_arch import VLM_ARCHITECTURES

    for name in cfg.reward.weights:
        if name not in REWARD_BUILDERS:
            raise ConfigError(f"{source}: 'reward.weights.{name}' is not a known reward {sorted(REWARD_BUILDERS)}")
    v = cfg.reward.vlm
    if "vlm" in cfg.reward.weights and v.init == "random" and v.arch not in VLM_ARCHITECTURES:
        raise ConfigError(f"{source}: 'reward.vlm.arch' must be one of {sorted(VLM_ARCHITECTURES)} with "
                          f"reward.vlm.init=random, got {v.arch!r}")
