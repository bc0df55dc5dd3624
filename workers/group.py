"""A worker group: N Ray actors of one class, placed on placement-group bundles, called together.

Single-controller style (verl, OpenRLHF): the driver holds the control flow and calls
`group.run("method", ...)`, which fans out to every actor and returns object refs. Arguments that are
object refs are passed through untouched, so data moves worker to worker without visiting the driver.

Placement: each pool gets bundles {CPU: k, GPU: g, <node_resource>: 0.001} from its `workers.<pool>`
config. With `workers.colocate=true` all pools share one placement group (one bundle per device slot)
and each actor asks for a fraction of its slot's resources, so roles take turns on the same devices.
Ray's placement groups: https://docs.ray.io/en/latest/ray-core/scheduling/placement-group.html
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger(__name__)

POOLS = ("rollout", "reward", "learner")
# In colocated mode each role takes this share of a slot, so all three fit in one bundle.
COLOCATED_SHARE = {"rollout": 0.3, "reward": 0.3, "learner": 0.3}


@dataclass
class Placement:
    """Where a pool's actor i goes: a placement group, a bundle index and the resources it asks for."""

    group: PlacementGroup
    bundles: List[int]
    num_cpus: float
    num_gpus: float
    resources: Dict[str, float]


def _bundle(pool_cfg, device_is_gpu: bool) -> Dict[str, float]:
    bundle = {"CPU": float(pool_cfg.num_cpus_per_worker)}
    if device_is_gpu and pool_cfg.num_gpus_per_worker > 0:
        bundle["GPU"] = float(pool_cfg.num_gpus_per_worker)
    if pool_cfg.node_resource:
        bundle[pool_cfg.node_resource] = 0.001
    return bundle


def plan_placements(workers_cfg, device_is_gpu: bool, timeout_s: float = 120) -> Dict[str, Placement]:
    """Reserve resources for all pools (waits until the cluster can host them, else a clear error)."""
    placements: Dict[str, Placement] = {}
    if workers_cfg.colocate:
        slots = max(workers_cfg[p].num_workers for p in POOLS)
        slot = {"CPU": max(float(workers_cfg[p].num_cpus_per_worker) for p in POOLS)}
        gpus = max(float(workers_cfg[p].num_gpus_per_worker) for p in POOLS)
        if device_is_gpu and gpus > 0:
            slot["GPU"] = gpus
        group = _reserve([dict(slot) for _ in range(slots)], "colocated", timeout_s)
        for pool in POOLS:
            share = COLOCATED_SHARE[pool]
            n = workers_cfg[pool].num_workers
            placements[pool] = Placement(group, list(range(n)), slot["CPU"] * share,
                                         slot.get("GPU", 0.0) * share, {})
        return placements
    for pool in POOLS:
        placements[pool] = plan_pool(workers_cfg, pool, device_is_gpu, timeout_s)
    return placements


def plan_pool(workers_cfg, pool: str, device_is_gpu: bool, timeout_s: float = 120) -> Placement:
    """Reserve one pool's bundles on their own (also what a tool that needs only that role uses, e.g.
    prefdata/candidates.py's rollout workers)."""
    pool_cfg = workers_cfg[pool]
    bundle = _bundle(pool_cfg, device_is_gpu)
    group = _reserve([dict(bundle) for _ in range(pool_cfg.num_workers)], pool, timeout_s)
    extra = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    return Placement(group, list(range(pool_cfg.num_workers)), bundle["CPU"], bundle.get("GPU", 0.0), extra)


def _reserve(bundles: List[Dict[str, float]], name: str, timeout_s: float) -> PlacementGroup:
    group = placement_group(bundles, strategy="PACK", name=f"identity-grpo-{name}")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise RuntimeError(
            f"workers.{name}: the Ray cluster cannot host bundles {bundles} within {timeout_s:.0f}s; "
            f"cluster resources: {ray.cluster_resources()}")
    return group


class WorkerGroup:
    """N actors of `actor_cls` (a plain class; made remote here), rank i on bundle i of its placement."""

    def __init__(self, name: str, actor_cls, placement: Placement, actor_args: Sequence[Any] = (),
                 max_restarts: int = 0, max_task_retries: int = 0, actors_per_call: int = 1):
        self.name = name
        # A call unit: `actors_per_call` consecutive actors that serve each call together (a context-parallel rollout
        # worker, policy/context_parallel.py); the unit's first actor's answer is the call's.
        self.actors_per_call = actors_per_call
        self._placement = placement
        self._remote_cls = ray.remote(actor_cls)
        self._args = tuple(actor_args)
        self._restarts = (max_restarts, max_task_retries)
        self.actors = [self._spawn(rank) for rank in range(len(placement.bundles))]

    def _spawn(self, rank: int):
        p = self._placement
        options = dict(
            num_cpus=p.num_cpus, num_gpus=p.num_gpus, resources=p.resources or None,
            max_restarts=self._restarts[0], max_task_retries=self._restarts[1],
            scheduling_strategy=PlacementGroupSchedulingStrategy(p.group, placement_group_bundle_index=p.bundles[rank]),
        )
        return self._remote_cls.options(**options).remote(rank, len(self._placement.bundles), *self._args)

    def __len__(self) -> int:
        return len(self.actors)

    def run(self, method: str, *args, **kwargs) -> List[ray.ObjectRef]:
        """Call `method(*args, **kwargs)` on every actor; returns one ref per actor."""
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def run_rank(self, rank: int, method: str, *args, **kwargs) -> ray.ObjectRef:
        return getattr(self.actors[rank], method).remote(*args, **kwargs)

    @property
    def units(self) -> List[List[Any]]:
        """The actors in call units (each alone unless `actors_per_call` > 1)."""
        n = self.actors_per_call
        return [self.actors[i:i + n] for i in range(0, len(self.actors), n)]

    def run_unit(self, unit: int, method: str, *args, **kwargs) -> ray.ObjectRef:
        """Call every actor of call unit `unit` with the same arguments; the ref of its first actor's answer (the
        others' are not kept: a unit's actors run one collective computation, so a failing one fails the first)."""
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.units[unit]][0]

    def run_split(self, method: str, per_rank_args: Sequence[Sequence[Any]], **kwargs) -> List[ray.ObjectRef]:
        """Call each actor with its own arguments (rank i gets per_rank_args[i])."""
        if len(per_rank_args) != len(self.actors):
            raise ValueError(f"{self.name}: {len(per_rank_args)} argument sets for {len(self.actors)} actors")
        return [getattr(a, method).remote(*args, **kwargs) for a, args in zip(self.actors, per_rank_args)]

    def round_robin(self, method: str, calls: Sequence[Sequence[Any]], **kwargs) -> List[ray.ObjectRef]:
        """One call per item, item i on call unit i % n (`method(*calls[i], **kwargs)`); refs in item order."""
        return [self.run_unit(i % len(self.units), method, *args, **kwargs) for i, args in enumerate(calls)]

    def strided(self, method: str, items: Sequence[Any], *args) -> "Strided":
        """One call per actor: actor r gets `method(*args, *items[r::n])` and returns one result per item it got;
        `.get()` on the answer puts them back in item order. Items may be object refs: they pass actor to actor."""
        n = len(self.actors)
        return Strided([getattr(a, method).remote(*args, *items[r::n]) for r, a in enumerate(self.actors)], len(items))

    def map_ordered(self, items: Iterable[Any], call: Callable[[Any, Any], ray.ObjectRef],
                    in_flight_per_actor: int = 2) -> Iterator[Tuple[Any, Any]]:
        """Stream work through the group: `call(actor, item)` submits an item (round robin over the call units, to
        each of a unit's actors; the first one's answer kept), at most `in_flight_per_actor` (+1) queued per unit,
        and (item, result) pairs come back in the items' order. The driver holds only the window's results, however
        many items there are; an actor Ray restarts re-runs its lost call, so the order and the results stay those of
        a clean run."""
        pending: Deque[Tuple[Any, ray.ObjectRef]] = deque()
        units = self.units
        window = in_flight_per_actor * len(units)
        for i, item in enumerate(items):
            pending.append((item, [call(actor, item) for actor in units[i % len(units)]][0]))
            if len(pending) > window:
                first, ref = pending.popleft()
                yield first, ray.get(ref)
        while pending:
            first, ref = pending.popleft()
            yield first, ray.get(ref)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def nodes(self) -> List[str]:
        """The Ray node id of each actor, in rank order."""
        return ray.get([actor.node_id.remote() for actor in self.actors])

    def join_context_groups(self) -> None:
        """Each call unit of several actors forms its process group (their `join_context_group`, at the address its
        first actor offers); a unit's actors join together, and every unit at once."""
        if self.actors_per_call == 1:
            return
        addresses = ray.get([unit[0].rendezvous.remote() for unit in self.units])
        ray.get([actor.join_context_group.remote(*address) for unit, address in zip(self.units, addresses)
                 for actor in unit])
        warn_split_across_nodes(self, self.actors_per_call)

    def respawn(self) -> None:
        """New actors on the same bundles (gang restart, e.g. the learner after a member died)."""
        self.kill()
        self.actors = [self._spawn(rank) for rank in range(len(self._placement.bundles))]


@dataclass
class Strided:
    """The pending answer of `WorkerGroup.strided`: one ref per actor, each a list of results for items r, r + n, ..."""

    refs: List[ray.ObjectRef]
    num_items: int

    def get(self) -> List[Any]:
        out: List[Any] = [None] * self.num_items
        for r, chunk in enumerate(ray.get(self.refs)):
            for j, result in enumerate(chunk):
                out[r + j * len(self.refs)] = result
        return out


def release(placements: Optional[Dict[str, Placement]]) -> None:
    seen = set()
    for p in (placements or {}).values():
        if id(p.group) not in seen:
            seen.add(id(p.group))
            remove_placement_group(p.group)


def warn_split_across_nodes(group: "WorkerGroup", degree: int) -> List[int]:
    """The context groups (`degree` consecutive actors: a rollout worker's, or learner ranks') whose actors Ray placed
    on more than one node, each logged: their all-to-alls then cross the network instead of the node's links. The
    pools' PACK placement fills a node before the next, so this takes a pool that does not fill whole nodes."""
    nodes = group.nodes()
    split = groups_across_nodes(nodes, degree)
    for g in split:
        log.warning("%s: the context group of actors %d-%d spans %d nodes; its all-to-alls go over the network",
                    group.name, g * degree, (g + 1) * degree - 1, len(set(nodes[g * degree:(g + 1) * degree])))
    return split


def groups_across_nodes(nodes: Sequence[str], degree: int) -> List[int]:
    """Indices of the groups of `degree` consecutive actors (given each actor's node) that span several nodes."""
    return [g for g in range(len(nodes) // degree) if len(set(nodes[g * degree:(g + 1) * degree])) > 1]
