"""Header-only index of a WebDataset tar shard, and random access to one sample's bytes.

Why an index instead of streaming through the tar: exact resume. The reader's order is a pure
function of (seed, epoch, shard headers), so it can be recomputed from the headers alone (512
bytes per member, found by seeking) and a restored reader skips ahead without reading or decoding
any media. Samples are then read by seeking to their members' data.

Grouping follows WebDataset exactly: a member `dir/key.ext.more` belongs to key `dir/key` with
extension `ext.more` (split at the first dot of the basename), and consecutive members with the
same key form one sample. A damaged shard is indexed up to the damage; the sample that the damage
touches is recorded with an `error` instead of being silently dropped or silently shortened, so
the reader can raise or skip it by name.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import braceexpand

BLOCK = 512
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a tar member name, as WebDataset splits it; (None, None) if no extension."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


@dataclass
class SampleRef:
    """Where one sample's members live in its shard; `error` is set when the shard is damaged there."""

    shard: str
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (data offset, size)
    error: str | None = None


@dataclass
class ShardIndex:
    path: str
    samples: list[SampleRef]
    error: str | None = None  # the shard cannot be read at all (missing, not a tar)


def expand_pattern(pattern: str | Sequence[str]) -> list[str]:
    """Expand brace patterns (`prompts-{000000..000003}.tar`) into a list of shard paths, in order.

    Accepts one pattern or a list of patterns. Raises FileNotFoundError naming the first missing
    shard: a typo in a shard pattern is a configuration error, not a bad sample to skip.
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    paths: list[str] = []
    for p in patterns:
        paths.extend(braceexpand.braceexpand(p))
    if not paths:
        raise FileNotFoundError(f"shard pattern {pattern!r} names no file")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"shard {p!r} (from pattern {pattern!r}) does not exist")
    return paths


def require_shards(cfg, keys: Sequence[str]) -> None:
    """ConfigError naming the key unless every shard of each of these brace patterns exists (unset keys pass):
    the check an entry point runs before it starts anything."""
    from omegaconf import OmegaConf

    from config import ConfigError

    for key in keys:
        pattern = OmegaConf.select(cfg, key)
        if pattern is None:
            continue
        try:
            expand_pattern(pattern)
        except FileNotFoundError as err:
            raise ConfigError(f"'{key}': {err}") from None


def _cut_member_name(f, offset: int) -> str | None:
    """Name in a partial header at `offset` (the name field is the first 100 bytes), if readable."""
    f.seek(offset)
    head = f.read(100)
    if len(head) < 100:
        return None
    name = head.split(b"\0", 1)[0]
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text and text.isprintable() else None


def index_shard(path: str) -> ShardIndex:
    """Scan the headers of one shard (no member data is read) and group members into samples."""
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")  # noqa: SIM115 - closed by `with f` below; open errors become index errors
    except OSError as err:
        return ShardIndex(path, [], error=f"cannot open shard: {err}")
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - holds nothing but `f`
        except (tarfile.TarError, EOFError, OSError) as err:
            return ShardIndex(path, [], error=f"not a readable tar file: {err}")
        samples: list[SampleRef] = []
        damage: str | None = None
        try:
            while True:
                info = tf.next()
                if info is None:
                    break
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if key is None:
                    continue
                if not samples or samples[-1].key != key:
                    samples.append(SampleRef(path, key))
                samples[-1].members[ext] = (info.offset_data, info.size)
                if info.offset_data + info.size > size:
                    samples[-1].error = (f"shard is truncated inside member {info.name!r} "
                                         f"(needs {info.offset_data + info.size} bytes, file has {size})")
                    damage = "reported"
                    break
        except (tarfile.TarError, EOFError, OSError) as err:
            damage = f"tar structure broken after offset {tf.offset}: {err}"
        if damage is None:
            # A complete tar ends with a zero block where the next header would be. Anything else
            # (end of file, a partial or garbled header) means the shard was cut or damaged here.
            f.seek(tf.offset)
            block = f.read(BLOCK)
            if len(block) == BLOCK and block.count(0) == BLOCK:
                return ShardIndex(path, samples)
            damage = f"shard is truncated or damaged at byte {tf.offset} (no end-of-archive block)"
        if damage != "reported":
            cut_name = _cut_member_name(f, tf.offset)
            cut_key = split_member_name(cut_name)[0] if cut_name else None
            if cut_key is not None and (not samples or cut_key != samples[-1].key):
                # The damage starts a new sample: everything before it is complete.
                samples.append(SampleRef(path, cut_key, error=f"{damage}; member {cut_name!r} is cut"))
            elif samples:
                samples[-1].error = f"{damage}; this sample, the last one before it, may be incomplete"
            else:
                return ShardIndex(path, [], error=damage)
        return ShardIndex(path, samples)


def read_members(ref: SampleRef, names: Sequence[str] | None = None, shard=None) -> dict[str, bytes]:
    """Read the bytes of every member of one sample, or of the named ones that it has (by seeking), from `shard` (the
    shard's file opened in binary mode, for callers reading many samples of it) or a fresh open. Raises OSError if a
    read is short."""
    if shard is None:
        with open(ref.shard, "rb") as f:
            return read_members(ref, names, f)
    out: dict[str, bytes] = {}
    for ext, (offset, size) in ref.members.items():
        if names is not None and ext not in names:
            continue
        shard.seek(offset)
        data = shard.read(size)
        if len(data) != size:
            raise OSError(f"short read of member {ref.key}.{ext}: got {len(data)} of {size} bytes "
                          "(shard changed or truncated since it was indexed)")
        out[ext] = data
    return out
