"""Write prompt or preference shards from a JSONL manifest or a folder (`python -m data.write_shards`).

    python -m data.write_shards --kind prompt --manifest prompts.jsonl --out data/shards
    python -m data.write_shards --kind preference --folder pairs/ --out data/shards --num-frames 33
    python -m data.write_shards --kind candidate --manifest real.jsonl --out cand/ --num-frames 33 --resample-frames

Every record is validated (files exist, images and videos decode, frame counts match, labels are
well formed) before the first byte is written; see data/manifest.py. Shards are named
`<prefix>-000000.tar`, ... and each is written under a hidden temporary name in the output folder
and renamed only when complete (rename is atomic on POSIX), so a crash never leaves a half shard
under a real shard name. Member mtimes are fixed, so the same input gives byte-identical shards.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from webdataset import TarWriter

from config import ExpectedError
from config.cli import report_expected
from data.manifest import (
    Record,
    load_record,
    read_folder,
    read_manifest,
    validate_records,
)
from data.schema import check_key

FIXED_MTIME = 946684800  # 2000-01-01: reproducible tar bytes
DEFAULT_PREFIX = {"prompt": "prompts", "preference": "pairs", "candidate": "candidates"}


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def brace_pattern(out_dir: str | Path, prefix: str, num_shards: int) -> str:
    """The brace pattern naming shards 0..num_shards-1, as the reader and DataConfig take it."""
    return str(Path(out_dir) / f"{prefix}-{{{0:06d}..{max(num_shards - 1, 0):06d}}}.tar")


class ShardWriter:
    """Writes samples (member name -> bytes) into numbered shards of at most `max_samples_per_shard`.

    Use as a context manager: on normal exit the last shard is completed; on an exception the open
    temporary shard is deleted and completed shards stay (each is whole).
    """

    def __init__(self, out_dir: str | Path, prefix: str, max_samples_per_shard: int = 1000, first_index: int = 0,
                 replaces: Iterable[str] = ()):
        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        if not prefix or "/" in prefix or "{" in prefix:
            raise ValueError(f"invalid shard prefix {prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples_per_shard
        self.first_index = first_index  # number of the first shard written (>0: adding to an existing set)
        self.replaces = list(replaces)  # old shards of this name: those not rewritten are removed once all is written
        self.paths: list[str] = []  # completed shards
        self._keys = set()
        self._tar: TarWriter | None = None
        self._file = None
        self._tmp: Path | None = None
        self._count = 0

    @property
    def num_samples(self) -> int:
        return len(self._keys)

    @property
    def pattern(self) -> str:
        return brace_pattern(self.out_dir, self.prefix, self.first_index + len(self.paths))

    def _open(self) -> None:
        final = self.out_dir / shard_name(self.prefix, self.first_index + len(self.paths))
        self._tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - spans many write() calls; closed by _finish/abort
        self._tar = TarWriter(self._file, encoder=False, mtime=FIXED_MTIME)
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.out_dir / shard_name(self.prefix, self.first_index + len(self.paths))
        os.replace(self._tmp, final)
        self.paths.append(str(final))
        self._tar = self._file = self._tmp = None

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r}: keys must be unique across the shards of one writer")
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": key, **members})
        self._keys.add(key)
        self._count += 1
        if self._count >= self.max_samples:
            self._finish()

    def close(self) -> list[str]:
        if self._tar is not None:
            self._finish()
        for stale in set(self.replaces) - set(self.paths):
            os.remove(stale)
        self.replaces = []
        return self.paths

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); completed shards are kept."""
        if self._tar is not None:
            try:
                self._tar.close()  # flushes into the temporary file, which is deleted next
            finally:
                self._file.close()
                self._tmp.unlink(missing_ok=True)
            self._tar = self._file = self._tmp = None

    def __enter__(self) -> ShardWriter:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def existing_shards(out_dir: str | Path, prefix: str) -> list[str]:
    return sorted(glob.glob(str(Path(out_dir) / f"{glob.escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")))


def existing_pattern(out_dir: str | Path, prefix: str) -> str:
    """The brace pattern of the `<prefix>-NNNNNN.tar` shards in `out_dir` (000000 alone when there are none yet)."""
    return brace_pattern(out_dir, prefix, len(existing_shards(out_dir, prefix)))


def replacing_writer(out_dir: str | Path, prefix: str, max_samples_per_shard: int = 1000, overwrite: bool = False,
                     what: str = "") -> ShardWriter:
    """A ShardWriter for a new set of `<prefix>-NNNNNN.tar` shards. Shards of that name already there are refused
    (FileExistsError, prefixed by `what`) unless `overwrite`; with it, those numbered past the new last one are
    removed after the new ones are complete."""
    before = existing_shards(out_dir, prefix)
    if before and not overwrite:
        raise FileExistsError(f"{what}{len(before)} shard(s) named {prefix}-NNNNNN.tar already exist in {out_dir} "
                              "(pass --overwrite to replace them)")
    return ShardWriter(out_dir, prefix, max_samples_per_shard, replaces=before)


def write_records(records: Iterable[Record], out_dir: str | Path, prefix: str, max_samples_per_shard: int = 1000,
                  overwrite: bool = False, problems: list | None = None, **load_kwargs) -> tuple[list[str], str]:
    """Validate all records, then write them; returns (shard paths, brace pattern).

    `problems`: parse problems found earlier, reported together with the file-level ones.
    Refuses to write over existing `<prefix>-NNNNNN.tar` files unless `overwrite`; with it, stale
    shards numbered past the new last one are removed after the new ones are complete.
    """
    records = list(records)
    validate_records(records, problems, **load_kwargs)
    if not records:
        raise ValueError("no records to write")
    with replacing_writer(out_dir, prefix, max_samples_per_shard, overwrite) as writer:
        for rec in records:
            writer.write(rec.key, load_record(rec, **load_kwargs))
    return writer.paths, writer.pattern


def split_by_prompt(pattern: str, out_dir: str | Path, prefixes: tuple[str, str], fraction: float, seed: int = 0,
                    max_samples_per_shard: int = 1000) -> tuple[str, str]:
    """Copy the samples of `pattern` (bytes unchanged) into two shard sets `<prefixes[0]>-*` and `<prefixes[1]>-*`;
    the second gets the samples whose prompt falls in a `fraction` of prompts drawn by hash of (seed, prompt), so
    no prompt is on both sides (a test split the training never saw the prompts of). The prompt is
    meta.extra.prompt_key where the sample has one (candidates' pairs), else meta.extra.clip (synthetic pairs of one
    clip), else the prompt text. Returns both brace patterns. A damaged shard, or a side left empty, raises
    ValueError before anything is written."""
    import hashlib
    import json

    from data.tarindex import expand_pattern, index_shard, read_members

    if not 0 < fraction < 1:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    plan = []  # (shard, its samples, the side of each): decided before anything is written
    for path in expand_pattern(pattern):
        index = index_shard(path)
        bad = index.error or next((ref.error for ref in index.samples if ref.error), None)
        if bad:
            raise ValueError(f"{path}: damaged shard ({bad})")
        sides = []
        with open(path, "rb") as shard:
            for ref in index.samples:
                members = read_members(ref, ["meta.json", "prompt.txt"], shard)
                extra = json.loads(members.get("meta.json", b"{}")).get("extra") or {}
                prompt = extra.get("prompt_key") or extra.get("clip") or \
                    members.get("prompt.txt", ref.key.encode()).decode("utf-8", "replace")
                digest = hashlib.sha1(f"{seed}:{prompt}".encode()).digest()
                sides.append(int(int.from_bytes(digest[:8], "big") / 2**64 < fraction))
        plan.append((path, index.samples, sides))
    counts = [sum(side == k for _, _, sides in plan for side in sides) for k in (0, 1)]
    if not all(counts):
        raise ValueError(f"{pattern}: no sample falls in the {prefixes[counts.index(0)]} split (fraction "
                         f"{fraction}); more prompts, or another fraction")
    writers = [ShardWriter(out_dir, prefix, max_samples_per_shard, replaces=existing_shards(out_dir, prefix))
               for prefix in prefixes]
    for path, samples, sides in plan:
        with open(path, "rb") as shard:
            for ref, side in zip(samples, sides, strict=True):
                writers[side].write(ref.key, read_members(ref, shard=shard))
    for writer in writers:
        writer.close()
    return writers[0].pattern, writers[1].pattern


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH like 240x416, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.write_shards", description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=["prompt", "preference", "candidate"], required=True,
                   help="candidate: external videos (real footage, another model's) to pair with generated candidates")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="JSONL manifest, one record per line (see data/SCHEMA.md)")
    src.add_argument("--folder", help="folder with one sub-folder per sample (see data/SCHEMA.md)")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--prefix", help="shard name prefix (default: prompts / pairs)")
    p.add_argument("--max-samples-per-shard", type=int, default=1000)
    p.add_argument("--num-frames", type=int, help="required frame count of every video")
    p.add_argument("--video-size", type=_size, help="resize + centre-crop videos to HEIGHTxWIDTH")
    p.add_argument("--fps", type=float, help="re-encode videos at this frame rate")
    p.add_argument("--resample-frames", action="store_true",
                   help="with --num-frames: resample videos of another length to it (uniform over the clip, duration "
                        "kept) instead of refusing them")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards with this prefix")
    args = p.parse_args(argv)
    for flag, value in (("--max-samples-per-shard", args.max_samples_per_shard), ("--num-frames", args.num_frames),
                        ("--fps", args.fps)):
        if value is not None and value <= 0:
            p.error(f"argument {flag}: must be > 0, got {value}")  # exit 2, one line naming the flag
    if args.resample_frames and args.num_frames is None:
        p.error("argument --resample-frames: needs --num-frames (the frame count to resample to)")
    try:
        problems: list = []
        records = (read_manifest(args.manifest, args.kind, problems) if args.manifest
                   else read_folder(args.folder, args.kind, problems))
        paths, pattern = write_records(records, args.out, args.prefix or DEFAULT_PREFIX[args.kind],
                                       args.max_samples_per_shard, args.overwrite, problems,
                                       num_frames=args.num_frames, resample_frames=args.resample_frames,
                                       video_size=args.video_size, fps=args.fps)
    except (ExpectedError, FileExistsError, FileNotFoundError, NotADirectoryError, ValueError) as err:
        return report_expected("write_shards", str(err))
    print(f"wrote {len(records)} {args.kind} samples in {len(paths)} shard(s): {pattern}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
