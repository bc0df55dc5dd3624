"""The config room: one tree of dataclasses for the whole system, loaded from YAML and `key=value` overrides.

A bottom room (README "Layout"): every other room may import it; it imports none of the project. Its checks
are pure; what only the models can answer (architectures, the reward registry, noise rules) policy/checks.py
and reward/checks.py answer, run together by workers/run_config.py `load_run_config`.

    schema.py  the dataclasses (every knob, its default and why)
    checks.py  value checks beyond types; ConfigError
    load.py    defaults <- YAML (with `base:`) <- overrides; to/from the YAML stored in checkpoints
    cli.py     the entry points' shared command line, range-checked arguments, the writable-path check
"""

from config.checks import (
                           LORA_KEYS,
                           PRECISION_OF_DTYPE,
                           RESUME_KEYS,
                           ConfigError,
                           ExpectedError,
                           describe_error,
                           stored_config_mismatches,
)
from config.load import config_from_yaml_text, load_config, load_structured, to_yaml
from config.schema import Config, DataConfig, FaceRewardConfig, LoraConfig, ModelConfig, RewardConfig, SamplerConfig

__all__ = ["Config", "ConfigError", "ExpectedError", "DataConfig", "FaceRewardConfig", "LORA_KEYS", "LoraConfig",
           "ModelConfig",
           "PRECISION_OF_DTYPE", "RESUME_KEYS", "RewardConfig", "SamplerConfig",
           "config_from_yaml_text", "describe_error", "load_config", "load_structured", "stored_config_mismatches",
           "to_yaml"]
