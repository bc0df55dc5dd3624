"""Data reader throughput: ShardReader with full decode vs raw tar iteration of the same shards.

    python bench/data_throughput.py [--samples 32] [--frames 17] [--height 128] [--width 224] [--workers 2]

Writes temporary preference shards (real-photo clips panning two pixels per frame, encoded as the
writer does), then measures samples per second of:
- raw tar: `tarfile` streaming over the shards, reading every member's bytes (the I/O floor);
- webdataset raw: a `webdataset.WebDataset` pipeline without decoding;
- ShardReader: header index + seek + PNG and mp4 decode, with 0 and N loader workers;
and the cost of a restore (fast-forward to the last sample, reading headers only).
Prints one summary line (for bench/RESULTS.md). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tarfile
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.reader import ShardReader
from data.schema import make_meta, preference_members
from data.video import VideoInfo, encode_video, resize_center_crop
from data.write_shards import ShardWriter


def build(out: str, samples: int, frames: int, height: int, width: int, per_shard: int) -> str:
    from skimage import data as skdata

    photo = resize_center_crop(skdata.astronaut(), height, width + 2 * frames + 2 * samples)
    ref = resize_center_crop(skdata.astronaut()[60:200, 160:290], 128, 128)
    with ShardWriter(out, "pairs", per_shard) as w:
        for i in range(samples):
            clips = [np.stack([photo[:, 2 * (i + t + s) : 2 * (i + t + s) + width] for t in range(frames)])
                     for s in (0, 1)]
            info = VideoInfo(frames, 16.0, height, width)
            meta = make_meta(1, ["eileen_collins"], "bench", {"a": info, "b": info})
            label = {"preference": "a", "source": "human"}
            w.write(f"s{i:05d}", preference_members(f"prompt {i}", [ref], encode_video(clips[0]),
                                                    encode_video(clips[1]), label, meta))
    return w.pattern


def rate(fn, repeat: int = 1) -> float:
    """Samples per second of the best of `repeat` runs of fn() (which returns its sample count)."""
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t))
    return best


def raw_tar(paths) -> int:
    keys = set()
    for p in paths:
        with tarfile.open(p, mode="r|") as tf:
            for m in tf:
                tf.extractfile(m).read()
                keys.add(m.name.split(".", 1)[0])
    return len(keys)


def wds_raw(pattern: str) -> int:
    import webdataset as wds

    return sum(1 for _ in wds.WebDataset(pattern, shardshuffle=False))


def reader_decode(pattern: str, workers: int) -> int:
    n = 0
    for s in ShardReader(pattern, kind="preference", epochs=1, num_workers=workers):
        n += 1
        assert s["video_a"].ndim == 4
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--per-shard", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        pattern = build(tmp, a.samples, a.frames, a.height, a.width, a.per_shard)
        write_s = time.perf_counter() - t
        paths = sorted(glob.glob(os.path.join(tmp, "pairs-*.tar")))
        mb = sum(os.path.getsize(x) for x in paths) / 2**20
        raw = rate(lambda: raw_tar(paths), 5)
        wraw = rate(lambda: wds_raw(pattern), 5)
        dec0 = rate(lambda: reader_decode(pattern, 0), 2)
        decw = rate(lambda: reader_decode(pattern, a.workers), 2)
        r = ShardReader(pattern, kind="preference", epochs=1)
        r.load_state_dict({**r.state_dict(), "position": a.samples - 1})
        t = time.perf_counter()
        next(iter(r))
        resume_ms = (time.perf_counter() - t) * 1e3
    print(f"data_throughput (preference, {a.samples} pairs of 2x {a.frames}x{a.height}x{a.width} mp4 + 1 ref, "
          f"{len(paths)} shards, {mb:.1f} MiB, written in {write_s:.1f} s, {os.cpu_count()} CPUs): "
          f"raw tar {raw:.0f} samples/s | webdataset raw {wraw:.0f} samples/s | "
          f"ShardReader decode {dec0:.1f} samples/s (0 workers), {decw:.1f} samples/s ({a.workers} workers) | "
          f"decode/raw {dec0 / raw:.4f} | restore to #{a.samples - 1} + 1 sample: {resume_ms:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
