"""Build DeepSpeed's CPU shared-memory communication op once, at install time.

The first `deepspeed.init_distributed` on a machine JIT-compiles this op with g++ (about a minute,
cached under TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions); doing it in `make install` keeps that
minute out of the first test or training run. Without a C++ compiler DeepSpeed cannot build it; we
then say so and carry on: gloo still works for every collective.
"""

import os
import sys

from workers.common import free_port


def main() -> int:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    import deepspeed
    import torch

    try:
        deepspeed.init_distributed(dist_backend="gloo")
    except Exception as err:  # noqa: BLE001 - report and continue: this is only a cache warm-up
        print(f"warm_ops: DeepSpeed could not build its shm op ({err}); gloo will be used", file=sys.stderr)
        return 0
    torch.distributed.destroy_process_group()
    print("warm_ops: DeepSpeed CPU ops ready")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
