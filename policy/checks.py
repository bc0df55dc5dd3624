"""The config keys only the policy room can check: `model.arch` (a known architecture of `model.kind`) and the
sampler's noise rule. Run after config/checks.py's pure checks by workers/run_config.py; a failure is a
ConfigError naming the key and the source."""

from __future__ import annotations

from config import ConfigError


def check_policy_config(cfg, source: str) -> None:
    from policy.arch import ARCHITECTURES, get_architecture
    from policy.sde import NoiseRule

    try:
        NoiseRule.from_config(cfg.sampler)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    m = cfg.model
    if m.init == "random" or m.arch is not None:
        try:
            get_architecture(m.arch, m.kind)
        except ValueError as err:
            raise ConfigError(f"{source}: {err} (model.init={m.init}; known: {sorted(ARCHITECTURES)})") from None
