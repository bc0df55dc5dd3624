"""A stand-in Ray actor that reports the GPU Ray gave it, in a module that imports nothing heavy: a test starts 24
of them at once (tests/test_cluster_launch.py), and each worker process imports the module that defines its class."""

import ray


class GpuProbe:
    def __init__(self, rank, world):
        self.rank = rank

    def gpu(self):
        return self.rank, [int(g) for g in ray.get_gpu_ids()]
