"""Full-weight sync by broadcast: learner rank 0 -> every rollout worker, over a process group of their own.

Why a separate group: the learner ranks' default torch.distributed group belongs to their DeepSpeed
engine (deepspeed.init_distributed), and rollout workers have none. Joining them into it would tie
the rollout pool's lifetime to the learner's collectives. So the weight group is built directly from
a TCPStore + ProcessGroupGloo (CPU) / ProcessGroupNCCL (GPUs; see `group_backend`), the way
`_new_process_group_helper` in torch/distributed/distributed_c10d.py builds one, without registering
it as a torch.distributed group. OpenRLHF does the same for vLLM weight updates (`init_process_group` of a separate
`_model_update_group`, then `update_weight` broadcasts parameter by parameter from rank 0:
OpenRLHF/OpenRLHF openrlhf/trainer/ray/vllm_worker_wrap.py); verl's vLLM sync is similar.

Members: rank 0 = learner rank 0 (root, hosts the TCPStore), ranks 1..N = rollout workers 0..N-1.
Every (re)build gets a new epoch: a new store port and a key prefix naming the epoch, so a rebuilt
group never sees an old one's keys. Collectives time out (`workers.weight_sync_timeout_s`) so a dead
peer raises a WeightSyncError naming the epoch and members instead of hanging (gloo enforces the
timeout in the op; on NCCL the watchdog does, and by default tears the process down, which Ray's
restart and the driver's learner recovery then handle).

`WeightSync` is the driver's side: it keeps the epoch, rebuilds the group whenever a member is not in
it (a fresh learner group, a rollout actor Ray restarted), and retries a failed broadcast once on a
rebuilt group.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Dict, List, Optional, Sequence

import ray
import torch
from ray.exceptions import RayActorError
from torch.distributed import PrefixStore, TCPStore

log = logging.getLogger(__name__)

Tensors = Dict[str, torch.Tensor]


class WeightSyncError(RuntimeError):
    """The weight group could not form, a peer died or timed out, or a receiver's weights do not match."""


def sync_mode(cfg) -> str:
    """`workers.weight_sync`: auto = broadcast for full fine-tuning, the object store for (small) LoRA."""
    mode = cfg.workers.weight_sync
    if mode == "auto":
        return "object_store" if cfg.model.lora.enabled else "broadcast"
    return mode


def group_backend(cfg) -> str:
    """NCCL between GPUs; gloo on CPU, and on GPU when roles are colocated (NCCL refuses two ranks on one
    device, and learner rank 0 shares rollout worker 0's; gloo moves CUDA tensors through the host)."""
    return "nccl" if cfg.trainer.device.startswith("cuda") and not cfg.workers.colocate else "gloo"


def sync_tensors(module: torch.nn.Module, lora: bool) -> Tensors:
    """What a policy version is made of, as live tensors of `module` (no copies): the trainable LoRA
    parameters, or the full state dict. Same names on learner and rollout (the same transformer)."""
    if lora:
        return {name: p.data for name, p in module.named_parameters() if p.requires_grad}
    return module.state_dict()


class WeightBroadcastGroup:
    """One member of a weight-broadcast group (rank 0 = root). Construction is collective: every member
    must construct it (concurrently), within the timeout."""

    def __init__(self, host: str, port: int, epoch: int, rank: int, members: Sequence[str], timeout_s: float,
                 device: str = "cpu", backend: str = "gloo"):
        self.epoch, self.rank, self.members = epoch, rank, list(members)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.timeout = timedelta(seconds=timeout_s)
        try:
            # The root hosts the store and waits for every member to connect; since pytorch/pytorch#111805
            # the master raises "Timed out ... waiting for clients" when one never comes (measured here:
            # tests/test_weight_sync.py). Constructors as in torch 2.13: ProcessGroupGloo(store, rank,
            # size, timeout), ProcessGroupNCCL(store, rank, size, options with _timeout).
            self._store = TCPStore(host, port, len(self.members), is_master=rank == 0, timeout=self.timeout,
                                   wait_for_workers=True)
            store = PrefixStore(f"identity_grpo/weight_sync/epoch{epoch}", self._store)
            self._pg = self._backend(store, backend)
        except Exception as err:  # noqa: BLE001 - re-raised with the group named
            raise WeightSyncError(f"{self}: could not form the group at {host}:{port}: {err}") from err

    def _backend(self, store, backend: str):
        size = len(self.members)
        if backend == "nccl":
            from torch.distributed import ProcessGroupNCCL

            torch.cuda.set_device(self.device)
            options = ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            return ProcessGroupNCCL(store, self.rank, size, options)
        from torch.distributed import ProcessGroupGloo

        return ProcessGroupGloo(store, self.rank, size, self.timeout)

    def __str__(self) -> str:
        return f"weight group epoch {self.epoch} (rank {self.rank} of {', '.join(self.members)})"

    def close(self) -> None:
        """Drop the connections (a rebuilt group uses a new store and port)."""
        self._pg, self._store = None, None

    # ------------------------------------------------------------------ root and receivers

    def broadcast(self, tensors: Tensors) -> None:
        """Root: send `tensors` one by one in sorted-name order, after a manifest the receivers check."""
        if self.rank != 0:
            raise WeightSyncError(f"{self}: only rank 0 broadcasts")
        names = sorted(tensors)
        manifest = [[n, list(tensors[n].shape), str(tensors[n].dtype).replace("torch.", "")] for n in names]
        self._bytes(json.dumps(manifest).encode())
        bad = self._agree(ok=True)
        if bad:
            raise WeightSyncError(f"{self}: the weights of {', '.join(self.members[r] for r in bad)} do not "
                                  "match the learner's (their errors name the tensor)")
        for name in names:
            self._tensor(tensors[name], name)

    def receive(self, into: Tensors) -> Tensors:
        """Receiver: fill `into` (e.g. the module's own state dict, so in place) with the root's tensors.
        Names, shapes and dtypes must match the root's exactly; otherwise every member raises."""
        manifest = json.loads(self._bytes(None).decode())
        problem = _mismatch(manifest, into)
        bad = self._agree(ok=problem is None)
        if problem is not None:
            raise WeightSyncError(f"{self}: {problem}")
        if bad:
            raise WeightSyncError(f"{self}: the weights of {', '.join(self.members[r] for r in bad)} do not match")
        for name, _, dtype in manifest:
            self._tensor(into[name], name, getattr(torch, dtype))
        return into

    # ------------------------------------------------------------------ collectives

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except Exception as err:  # noqa: BLE001 - a dead or stuck peer: name the group and what was sent
            raise WeightSyncError(f"{self}: {what} failed (a member died or timed out after "
                                  f"{self.timeout.total_seconds():.0f}s): {err}") from err

    def _tensor(self, tensor: torch.Tensor, name: str, sent_dtype: Optional[torch.dtype] = None) -> None:
        """Broadcast one tensor as raw bytes (bit-exact for every dtype, bf16 included). A receiver whose
        tensor has another dtype than the root's receives in the root's and casts (e.g. diffusers keeps
        some Wan modules in fp32 while a bf16 DeepSpeed engine trains them in bf16)."""
        buf, staged = tensor.detach(), True
        if sent_dtype is not None and sent_dtype != buf.dtype:
            buf = torch.empty(buf.shape, dtype=sent_dtype, device=self.device)
        elif buf.device != self.device or not buf.is_contiguous():
            buf = buf.to(self.device).contiguous()
        else:
            staged = False  # the tensor's own storage is sent / received into directly
        data = buf.view(-1).view(torch.uint8)
        self._wait(self._pg.broadcast(data, 0), f"tensor '{name}'")
        if staged and self.rank != 0:
            tensor.copy_(buf)

    def _bytes(self, payload: Optional[bytes]) -> bytes:
        """Broadcast a byte string from the root (length first)."""
        size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64, device=self.device)
        self._wait(self._pg.broadcast(size, 0), "manifest size")
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        if payload is not None:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        self._wait(self._pg.broadcast(data, 0), "manifest")
        return data.cpu().numpy().tobytes()

    def _agree(self, ok: bool) -> List[int]:
        """All-reduce one flag per member; returns the ranks that are not ok, the same on every member."""
        flags = torch.zeros(len(self.members), dtype=torch.int64, device=self.device)
        flags[self.rank] = 0 if ok else 1
        self._wait(self._pg.allreduce(flags), "manifest check")
        return [r for r, flag in enumerate(flags.tolist()) if flag]


def _mismatch(manifest: list, own: Tensors) -> Optional[str]:
    """The first difference between the root's (name, shape, dtype) list and this member's tensors."""
    sent = {name for name, _, _ in manifest}
    for name, shape, dtype in manifest:
        if name not in own:
            return f"tensor '{name}' is sent by the learner but this worker's model has no such tensor"
        mine = own[name]
        if list(mine.shape) != shape or mine.dtype.is_floating_point != getattr(torch, dtype).is_floating_point:
            return (f"tensor '{name}': learner sends {dtype}{shape}, this worker's model has "
                    f"{str(mine.dtype).replace('torch.', '')}{list(mine.shape)}")
    extra = sorted(set(own) - sent)
    if extra:
        return f"tensor '{extra[0]}' of this worker's model is not sent by the learner ({len(extra)} such tensors)"
    return None


class WeightGroupMember:
    """Mixin for the actors in the group (learner rank 0, rollout workers): join and report the epoch."""

    _weight_group: Optional[WeightBroadcastGroup] = None

    def join_weight_group(self, host: str, port: int, epoch: int, rank: int, members: List[str],
                          timeout_s: float) -> int:
        """Leave any previous group and join epoch `epoch` as `rank` (blocks until all members joined)."""
        if self._weight_group is not None:
            self._weight_group.close()
            self._weight_group = None
        self._weight_group = WeightBroadcastGroup(host, port, epoch, rank, members, timeout_s,
                                                  device=self.cfg.trainer.device, backend=group_backend(self.cfg))
        return epoch

    def weight_group_epoch(self) -> Optional[int]:
        """The epoch this actor's group belongs to; None for a fresh (e.g. restarted) actor."""
        return None if self._weight_group is None else self._weight_group.epoch

    def weight_group(self) -> WeightBroadcastGroup:
        if self._weight_group is None:
            raise WeightSyncError(f"{type(self).__name__}[{self.rank}] is in no weight group (restarted?); "
                                  "the driver rebuilds the group before the next broadcast")
        return self._weight_group


class WeightSync:
    """Driver side: group bookkeeping and one publish (broadcast + the learner's recovery copy).

    The learner returns rank 0's state dict as well (kept per version by the driver): healthy workers
    never fetch it; a restarted rollout worker's re-queued `generate` does (through `weights_box`),
    and async checkpoints save the in-flight version from it.
    """

    def __init__(self, workers, timeout_s: float):
        self.workers = workers  # launcher.cluster.Workers
        self.timeout_s = timeout_s
        self.epoch = 0  # 0 = no group yet; the first build is epoch 1

    def members(self) -> List[str]:
        return ["learner[0]"] + [f"rollout[{i}]" for i in range(len(self.workers.rollout))]

    def _actors(self) -> list:
        return [self.workers.learner.actors[0], *self.workers.rollout.actors]

    def ensure_group(self) -> None:
        """Rebuild the group unless every member reports the current epoch. The query queues behind
        each rollout worker's running calls, so the broadcast that follows finds them idle."""
        epochs = ray.get([a.weight_group_epoch.remote() for a in self._actors()])
        stale = [m for m, e in zip(self.members(), epochs) if e != self.epoch]
        if stale:
            self.rebuild("first publish" if self.epoch == 0 else f"not in epoch {self.epoch}: {', '.join(stale)}")

    def rebuild(self, reason: str) -> None:
        """New epoch, new port on learner rank 0's node; every member joins (collectively)."""
        self.epoch += 1
        host, port = ray.get(self.workers.learner.run_rank(0, "rendezvous"))
        log.info("weight sync: building group epoch %d at %s:%d (%s)", self.epoch, host, port, reason)
        joins = [a.join_weight_group.remote(host, port, self.epoch, rank, self.members(), self.timeout_s)
                 for rank, a in enumerate(self._actors())]
        ray.get(joins)

    def publish(self, version: int):
        """Broadcast `version` to every rollout worker; returns rank 0's ref to the recovery copy.
        A failed broadcast (a peer died, a timeout) is retried once on a rebuilt group."""
        self.ensure_group()
        for attempt in (1, 2):
            learner = [a.publish.remote(version, broadcast=True) for a in self.workers.learner.actors]
            receives = [a.receive_weights.remote(version) for a in self.workers.rollout.actors]
            status = [ref for ref, _ in learner] + receives
            # Let every call settle (each is bounded by the timeout) before judging or rebuilding, so
            # that no member is still inside the old group's collective when the new one forms.
            ray.wait(status, num_returns=len(status))
            errors = []
            names = [f"learner[{r}]" for r in range(len(learner))] + self.members()[1:]
            for name, ref in zip(names, status):
                try:
                    ray.get(ref)
                except RayActorError as err:
                    if name.startswith("learner"):
                        raise  # a learner rank died: the driver's learner recovery takes over
                    errors.append(f"{name}: actor died ({type(err).__name__})")
                except Exception as err:  # noqa: BLE001 - collected, named, re-raised below
                    errors.append(f"{name}: {_what_failed(err)}")
            if not errors:
                return learner[0][1]
            if attempt == 2:
                raise WeightSyncError(f"weight broadcast of version {version} failed twice (epoch {self.epoch}): "
                                      + "; ".join(errors))
            log.warning("weight sync: broadcast of version %d failed (%s); rebuilding the group and retrying",
                        version, "; ".join(errors))
            self.rebuild("retry after a failed broadcast")


def _what_failed(err: Exception) -> str:
    """A Ray task error's message is the remote traceback; its cause's last line says what happened."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, Exception):
        return f"{type(cause).__name__}: {cause}"
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
