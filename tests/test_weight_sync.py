"""Full-weight sync by broadcast (workers/weight_sync.py).

One group of 3 spawned processes (root + 2 receivers) runs the scenarios in order: exact delivery of
float32 / bfloat16 / int64 tensors, a receiver whose model does not match, a receiver that dies after
joining, and a group that cannot form because that member is gone. The training loop with broadcast
sync (real Ray + DeepSpeed) is tested in tests/test_loop.py.
"""

import multiprocessing as mp
import time

import pytest
import torch

from config import ConfigError, load_config
from runtime.distributed import free_port
from workers.weight_sync import WeightBroadcastGroup, WeightSyncError

MEMBERS = ["learner[0]", "rollout[0]", "rollout[1]"]
TIMEOUT_S = 5.0


def weights(fill: bool) -> dict:
    """Root: values that are not round numbers; receivers: zeros of the same names, shapes and dtypes."""
    gen = torch.Generator().manual_seed(0)
    full = {
        "blocks.0.weight": torch.randn(7, 5, generator=gen),
        "blocks.0.scale": torch.randn(3, 4, generator=gen).to(torch.bfloat16),
        "step": torch.tensor(123456789012, dtype=torch.int64),  # 0-dim
        "table": torch.randint(-2**40, 2**40, (4, 3), generator=gen, dtype=torch.int64),
        "transposed": torch.randn(4, 6, generator=gen).t(),  # not contiguous
    }
    return full if fill else {k: torch.zeros_like(v) for k, v in full.items()}


def member(rank: int, ports: list, results) -> None:
    """One process of the group: the four scenarios in order, each result (or error) reported."""
    torch.set_num_threads(1)

    def report(name, fn):
        start = time.monotonic()
        try:
            out = fn()
        except WeightSyncError as err:
            out = f"WeightSyncError: {err}"
        results.put((rank, name, out, time.monotonic() - start))

    def deliver():
        group = WeightBroadcastGroup("127.0.0.1", ports[0], 1, rank, MEMBERS, TIMEOUT_S)
        if rank == 0:
            return group.broadcast(weights(fill=True))
        mine = weights(fill=False)
        if rank == 2:  # an fp32 copy of what the root trains in bf16 (diffusers' fp32-kept Wan modules)
            mine["blocks.0.scale"] = torch.zeros(3, 4, dtype=torch.float32)
        return group.receive(mine)

    def mismatch():
        group = WeightBroadcastGroup("127.0.0.1", ports[1], 2, rank, MEMBERS, TIMEOUT_S)
        if rank == 0:
            return group.broadcast(weights(fill=True))
        mine = weights(fill=False)
        if rank == 2:
            mine["table"] = torch.zeros(4, 4, dtype=torch.int64)
        return group.receive(mine)

    def peer_dies():
        group = WeightBroadcastGroup("127.0.0.1", ports[2], 3, rank, MEMBERS, TIMEOUT_S)
        if rank == 2:
            results.close()
            results.join_thread()
            import os

            os._exit(0)  # joined, then gone before the broadcast
        time.sleep(1.0)
        if rank == 0:
            return group.broadcast(weights(fill=True))
        return group.receive(weights(fill=False))

    def peer_absent():  # rank 2 is dead by now: the group cannot form
        group = WeightBroadcastGroup("127.0.0.1", ports[3], 4, rank, MEMBERS, TIMEOUT_S)
        return group.broadcast(weights(fill=True)) if rank == 0 else group.receive(weights(fill=False))

    report("deliver", deliver)
    report("mismatch", mismatch)
    report("peer_dies", peer_dies)
    report("peer_absent", peer_absent)


@pytest.fixture(scope="module")
def outcomes():
    """{(rank, scenario): (result, seconds)} from one run of the three processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ports = [free_port() for _ in range(4)]
    procs = [ctx.Process(target=member, args=(rank, ports, results)) for rank in range(3)]
    for p in procs:
        p.start()
    out = {}
    expected = 3 * 4 - 2  # rank 2 reports the first two scenarios only
    deadline = time.monotonic() + 180
    while len(out) < expected and time.monotonic() < deadline:
        rank, name, result, seconds = results.get(timeout=max(1.0, deadline - time.monotonic()))
        out[rank, name] = (result, seconds)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return out


def test_broadcast_is_bit_exact_across_processes(outcomes):
    assert outcomes[0, "deliver"][0] is None
    sent = weights(fill=True)
    cast = outcomes[2, "deliver"][0]["blocks.0.scale"]  # received in bf16, cast into the fp32 tensor
    assert cast.dtype == torch.float32 and torch.equal(cast, sent["blocks.0.scale"].float())
    for rank in (1, 2):
        got = outcomes[rank, "deliver"][0]
        assert isinstance(got, dict), got
        assert set(got) == set(sent)
        for name, tensor in sent.items():
            if rank == 2 and name == "blocks.0.scale":
                continue
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
            assert torch.equal(got[name].contiguous().view(-1).view(torch.uint8),
                               tensor.contiguous().view(-1).view(torch.uint8)), name  # same bits
    assert sent["blocks.0.scale"].dtype == torch.bfloat16 and sent["step"].dim() == 0


def test_mismatched_receiver_names_the_tensor(outcomes):
    culprit = outcomes[2, "mismatch"][0]
    assert culprit.startswith("WeightSyncError") and "'table'" in culprit and "[4, 3]" in culprit
    assert "[4, 4]" in culprit and "epoch 2" in culprit
    root = outcomes[0, "mismatch"][0]
    assert root.startswith("WeightSyncError") and "the weights of rollout[1] do not match" in root  # the culprit
    assert outcomes[1, "mismatch"][0].startswith("WeightSyncError")  # nobody is left waiting
    assert all(outcomes[r, "mismatch"][1] < TIMEOUT_S for r in range(3))  # agreed at once, no timeout


def test_dead_peer_makes_the_root_raise_within_the_timeout(outcomes):
    for scenario, epoch in (("peer_dies", 3), ("peer_absent", 4)):
        message, seconds = outcomes[0, scenario]
        assert isinstance(message, str) and message.startswith("WeightSyncError"), (scenario, message)
        assert f"epoch {epoch}" in message and "learner[0], rollout[0], rollout[1]" in message  # the group
    # a member that died after joining: its closed connection is noticed at once (measured 1.5 s, 1 s of it the
    # scenario's own sleep); one that never joins: the store waits out the timeout, and little more (measured 6.0 s)
    assert outcomes[0, "peer_dies"][1] < TIMEOUT_S, outcomes[0, "peer_dies"]
    assert TIMEOUT_S <= outcomes[0, "peer_absent"][1] < 1.5 * TIMEOUT_S, outcomes[0, "peer_absent"]


def test_weight_sync_config_is_checked(root):
    base = root / "cluster_configs" / "local_cpu.yaml"
    need = ["data.prompt_shards=x", "trainer.output_dir=y"]
    cfg = load_config(base, need)
    assert cfg.workers.weight_sync == "auto" and cfg.workers.weight_sync_timeout_s > 0
    with pytest.raises(ConfigError, match="workers.weight_sync"):
        load_config(base, need + ["workers.weight_sync=nccl"])
    with pytest.raises(ConfigError, match="workers.weight_sync_timeout_s"):
        load_config(base, need + ["workers.weight_sync_timeout_s=0"])

