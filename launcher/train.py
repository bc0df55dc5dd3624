"""Identity-GRPO training driver (single controller).

    python -m launcher.train --config cluster_configs/local_cpu.yaml [key.sub=value ...] [--print-config]
"""

from __future__ import annotations

from typing import Optional, Sequence

from launcher.cli import parse_config


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg, _ = parse_config(__doc__, argv)
    raise NotImplementedError(
        "launcher.train: the distributed GRPO loop (rollout/reward/learner workers) is not built yet; "
        "see README 'Not built yet'. `--print-config` works.")


if __name__ == "__main__":
    main()
