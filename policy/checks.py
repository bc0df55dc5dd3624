"""The config keys only the policy room can check: `model.arch` (a known architecture of `model.kind`), the
sampler's noise rule, and whether the architecture's heads split over `model.context_parallel.ulysses`. Run after
config/checks.py's pure checks by workers/run_config.py; a failure is a ConfigError naming the key and the source."""

from __future__ import annotations

from config import ConfigError


def check_policy_config(cfg, source: str) -> None:
    from policy.arch import ARCHITECTURES, get_architecture, transformer_config
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
        heads = transformer_config(m.arch, m.kind)["num_attention_heads"]
        if heads % m.context_parallel.ulysses:
            raise ConfigError(f"{source}: 'model.context_parallel.ulysses' ({m.context_parallel.ulysses}) must divide "
                              f"{m.arch}'s {heads} attention heads (Ulysses gives each rank whole heads)")
