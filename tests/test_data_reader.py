"""Reader: exact resume (mid-shard, shard and epoch boundaries, loader workers), rank splits, config."""

import itertools
import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from data.reader import ShardReader, from_config
from data.schema import make_meta, prompt_members
from data.write_shards import ShardWriter

SHARDS, PER_SHARD = 4, 5  # 20 samples; 5 per shard so order effects cross shard boundaries
N = SHARDS * PER_SHARD


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("reader")
    rng = np.random.default_rng(0)
    with ShardWriter(out, "prompts", PER_SHARD) as w:
        for i in range(N):
            ref = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            w.write(f"s{i:03d}", prompt_members(f"prompt {i}", [ref], make_meta(1, [f"id{i}"], "test")))
    return str(out / "prompts-{000000..000003}.tar")


def take(reader, n):
    it = iter(reader)
    return [next(it)["key"] for _ in range(n)]


def reader(pattern, **kw):
    kw.setdefault("shuffle_buffer", 6)
    kw.setdefault("seed", 7)
    return ShardReader(pattern, **kw)


def test_epoch_is_a_permutation_and_epochs_differ(shards):
    keys = [s["key"] for s in reader(shards, epochs=3)]
    epochs = [keys[i * N : (i + 1) * N] for i in range(3)]
    for e in epochs:
        assert sorted(e) == [f"s{i:03d}" for i in range(N)]
    assert epochs[0] != epochs[1] != epochs[2]
    assert keys == [s["key"] for s in reader(shards, epochs=3)]  # deterministic
    assert keys[:N] != [s["key"] for s in reader(shards, epochs=1, seed=8)]  # seed matters
    assert [s["key"] for s in reader(shards, epochs=1, shuffle=False)] == sorted(keys[:N])


@pytest.mark.parametrize("shuffle", [True, False])
def test_restore_yields_exactly_the_uninterrupted_continuation(shards, shuffle):
    """k in 0..2N covers mid-shard, every shard boundary (k % 5 == 0 unshuffled) and the epoch boundary."""
    n = 7
    full = take(reader(shards, shuffle=shuffle), 2 * N + n)
    for k in range(2 * N + 1):
        first = reader(shards, shuffle=shuffle)
        assert take(first, k) == full[:k]
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        restored = reader(shards, shuffle=shuffle)
        restored.load_state_dict(state)
        assert take(restored, n) == full[k : k + n], f"resume after {k} samples"
    assert (state["epoch"], state["position"]) == (1, N)  # k = 2N: end of epoch 1, epoch 2 not begun


def test_state_counts_position_within_epoch(shards):
    r = reader(shards)
    take(r, N + 3)
    assert r.position == (1, 3)
    r2 = reader(shards, epochs=2)
    r2.load_state_dict(r.state_dict())
    assert len(list(r2)) == N - 3  # finite epochs stop after the restored epoch's remainder


def test_iterating_again_continues_and_stale_iterators_refuse(shards):
    full = take(reader(shards), 10)
    r = reader(shards)
    old = iter(r)
    got = [next(old)["key"] for _ in range(4)]
    new = iter(r)  # continues from the consumed position
    got += [next(new)["key"] for _ in range(6)]
    assert got == full
    with pytest.raises(RuntimeError, match="stale"):
        next(old)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_and_cover_everything(shards, world_size):
    per_rank = [[s["key"] for s in reader(shards, rank=r, world_size=world_size, epochs=1)]
                for r in range(world_size)]
    flat = list(itertools.chain(*per_rank))
    assert len(flat) == len(set(flat)) == N
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    # Rank r's stream is every world_size-th element of the single-rank order.
    whole = [s["key"] for s in reader(shards, epochs=1)]
    for r in range(world_size):
        assert per_rank[r] == whole[r::world_size]


def test_rank_resume(shards):
    full = take(reader(shards, rank=1, world_size=2), 25)
    a = reader(shards, rank=1, world_size=2)
    take(a, 9)
    b = reader(shards, rank=1, world_size=2)
    b.load_state_dict(a.state_dict())
    assert take(b, 16) == full[9:]


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_loader_workers_keep_order_and_state(shards):
    plain = [s["key"] for s in reader(shards, epochs=2, shuffle_buffer=3)]
    with_workers = reader(shards, epochs=2, shuffle_buffer=3, num_workers=2)
    assert [s["key"] for s in with_workers] == plain  # N=20 per epoch; 3 workers below makes it uneven
    assert [s["key"] for s in reader(shards, epochs=2, shuffle_buffer=3, num_workers=3)] == plain
    # Resume across worker counts: save with 2 workers, restore with 0 and with 3.
    w = reader(shards, epochs=2, shuffle_buffer=3, num_workers=2)
    it = iter(w)
    head = [next(it)["key"] for _ in range(13)]
    del it
    state = w.state_dict()
    for workers in (0, 3):
        r = reader(shards, epochs=2, shuffle_buffer=3, num_workers=workers)
        r.load_state_dict(state)
        assert head + [s["key"] for s in r] == plain


def test_load_state_refuses_a_different_order(shards):
    state = reader(shards).state_dict()
    for change, field in [({"seed": 8}, "seed"), ({"world_size": 2}, "world_size"),
                          ({"shuffle_buffer": 2}, "shuffle_buffer"), ({"kind": "preference"}, "kind")]:
        with pytest.raises(ValueError, match=f"saved with {field}="):
            reader(shards, **change).load_state_dict(state)
    fewer = shards.replace("000003", "000002")
    with pytest.raises(ValueError, match="saved with shards="):
        reader(fewer).load_state_dict(state)


def test_from_config_uses_data_config_fields(shards):
    from config import DataConfig

    cfg = OmegaConf.structured(DataConfig(prompt_shards=shards, preference_shards="unused", shuffle_buffer=6,
                                          seed=7, on_error="skip", num_loader_workers=0))
    r = from_config(cfg, "prompt", rank=0, world_size=1)
    assert r.on_error == "skip" and r.num_workers == 0
    assert take(r, 12) == take(reader(shards), 12)
    with pytest.raises(ValueError, match="kind"):
        ShardReader.from_config(cfg, "video")


def test_bad_arguments_and_missing_shards(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts-000004.tar.*does not exist"):
        ShardReader(shards.replace("000003", "000009"))
    with pytest.raises(ValueError, match="rank"):
        ShardReader(shards, rank=2, world_size=2)
    with pytest.raises(ValueError, match="on_error"):
        ShardReader(shards, on_error="ignore")
    with pytest.raises(ValueError, match="gets no sample"):
        list(ShardReader(shards.replace("{000000..000003}", "000000"), rank=5, world_size=6, epochs=1))


def test_inside_an_external_dataloader_workers_split_the_stream(shards):
    """Wrapped in someone else's DataLoader, each worker takes its share: every sample exactly once."""
    from torch.utils.data import DataLoader

    loader = DataLoader(reader(shards, epochs=1), batch_size=None, num_workers=2, collate_fn=lambda x: x)
    keys = [s["key"] for s in loader]
    assert sorted(keys) == [f"s{i:03d}" for i in range(N)]
    assert keys == [s["key"] for s in reader(shards, epochs=1)]  # round-robin of the split = same order
