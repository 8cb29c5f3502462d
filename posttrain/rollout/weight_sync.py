"""Weight sync for server mode: the trainer broadcasts its named tensors to rollout workers over torch.distributed.

The trainer is rank 0 and hosts the rendezvous (a ``TCPStore`` on ``host:port``); each rollout worker (a
``posttrain vllm-serve`` process, or any process holding a :class:`WeightReceiver`) joins as rank 1..N. The group is
its own process group (``ProcessGroupGloo`` on the CPU, ``ProcessGroupNCCL`` on GPUs), built directly on the store,
so it never touches the default group that accelerate may own in the trainer or that vLLM owns in its workers.

One sync (``WeightSender.send``):
  1. header: the version and every tensor's name, dtype and shape, as JSON (a length, then the bytes);
  2. the tensors, in the header's order, flattened into the buckets the header lists (at most ``bucket_bytes``
     each, one dtype per bucket);
  3. acknowledgement: an all-reduce in which every worker adds 1 once it has applied the weights; the sender
     checks that all of them did.
Every collective waits at most ``timeout_s``: a peer that never joins, dies, or stops answering mid-sync gives a
:class:`WeightSyncError` naming the phase, the tensor and the peers, never a hang. ``close`` tells workers to leave.

NCCL needs blocking waits to honour the time-out: ``TORCH_NCCL_BLOCKING_WAIT=1`` is set (if unset) before an NCCL
group is built. This module never changes a model itself: workers pass a function that applies what they receive.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

STORE_PREFIX = "posttrain-weight-sync"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                        torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)}


class WeightSyncError(RuntimeError):
    """The weight sync failed or timed out: which phase, which tensor, which peers."""


@dataclass
class SyncGroupConfig:
    """host, port: where the trainer (rank 0) hosts the rendezvous.  world_size: 1 + the number of workers.
    backend: ``gloo`` (CPU tensors) or ``nccl`` (CUDA tensors).  timeout_s: the longest any step may wait.
    bucket_bytes: tensors of one dtype are sent together, flattened, up to this many bytes per broadcast."""

    host: str = "127.0.0.1"
    port: int = 51216
    world_size: int = 2
    backend: str = "gloo"
    timeout_s: float = 60.0
    bucket_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"weight sync backend must be gloo or nccl, got {self.backend!r}")
        if self.world_size < 2:
            raise ValueError(f"weight sync world_size must be >= 2 (the trainer and a worker), got {self.world_size}")
        if self.timeout_s <= 0:
            raise ValueError(f"weight sync timeout_s must be > 0, got {self.timeout_s}")


class _Group:
    def __init__(self, cfg: SyncGroupConfig, rank: int, device: torch.device | str | None = None):
        self.cfg, self.rank = cfg, rank
        self.device = torch.device(device or ("cuda" if cfg.backend == "nccl" else "cpu"))
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        where = f"{cfg.host}:{cfg.port}"
        t0 = time.monotonic()
        try:  # rank 0 waits here for every worker to join, or the time-out
            store = dist.TCPStore(cfg.host, cfg.port, cfg.world_size, is_master=rank == 0, timeout=timeout,
                                  wait_for_workers=True)
        except Exception as e:  # noqa: BLE001 - DistStoreError, RuntimeError, TimeoutError depending on the side
            who = ("not every rollout worker joined" if rank == 0 else "the trainer's rendezvous did not answer")
            raise WeightSyncError(f"weight sync (rank {rank} of {cfg.world_size}) at {where}: {who} within "
                                  f"{cfg.timeout_s:g} s ({time.monotonic() - t0:.1f} s): {e}") from None
        self.store = dist.PrefixStore(STORE_PREFIX, store)
        try:
            if cfg.backend == "gloo":
                self.pg = dist.ProcessGroupGloo(self.store, rank, cfg.world_size, timeout)
            else:
                os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self.pg = dist.ProcessGroupNCCL(self.store, rank, cfg.world_size, options)
        except Exception as e:  # noqa: BLE001
            raise WeightSyncError(f"weight sync (rank {rank}) at {where}: the {cfg.backend} group could not be "
                                  f"built: {e}") from None
        self._store_keepalive = store

    def shutdown(self) -> None:
        """Leave the group: its backend's threads are stopped here, not by an interpreter exit racing them (gloo
        aborted the process with 'terminate called without an active exception' at exit)."""
        pg, self.pg = getattr(self, "pg", None), None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception as e:  # noqa: BLE001 - a peer already gone: nothing left to leave
                logger.debug("weight sync (rank %d): shutdown: %s", self.rank, e)

    def _wait(self, work, phase: str) -> None:
        t0 = time.monotonic()
        try:
            ok = work.wait(datetime.timedelta(seconds=self.cfg.timeout_s))
        except Exception as e:  # noqa: BLE001 - gloo raises on a closed connection or its time-out
            raise WeightSyncError(
                f"weight sync (rank {self.rank} of {self.cfg.world_size}, {self.cfg.host}:{self.cfg.port}) failed "
                f"during {phase} after {time.monotonic() - t0:.1f} s (time-out {self.cfg.timeout_s:g} s): a peer "
                f"died or stopped answering: {e}") from None
        if ok is False:
            raise WeightSyncError(f"weight sync (rank {self.rank}): {phase} timed out after {self.cfg.timeout_s:g} s")

    def broadcast(self, tensor: torch.Tensor, phase: str) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self._wait(self.pg.broadcast([tensor], opts), phase)

    def all_reduce(self, tensor: torch.Tensor, phase: str) -> None:
        self._wait(self.pg.allreduce([tensor]), phase)

    def _header(self, payload: dict | None) -> dict:
        if payload is not None:
            data = torch.tensor(list(json.dumps(payload).encode()), dtype=torch.uint8, device=self.device)
            size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        else:
            size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.broadcast(size, "the header's length")
        if payload is None:
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self.broadcast(data, "the header")
        return json.loads(bytes(data.cpu().tolist()).decode())

    def buckets(self, metas: list[dict]) -> list[list[int]]:
        """Indices of tensors sent together: consecutive tensors of one dtype up to bucket_bytes."""
        out: list[list[int]] = []
        size = 0
        for i, m in enumerate(metas):
            nbytes = math.prod(m["shape"]) * _DTYPES[m["dtype"]].itemsize
            if out and metas[out[-1][0]]["dtype"] == m["dtype"] and size + nbytes <= self.cfg.bucket_bytes:
                out[-1].append(i)
                size += nbytes
            else:
                out.append([i])
                size = nbytes
        return out


class WeightSender(_Group):
    """The trainer's side (rank 0)."""

    def __init__(self, cfg: SyncGroupConfig, device=None):
        super().__init__(cfg, 0, device)
        self.version = 0

    @torch.no_grad()
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        """Broadcast the tensors to every worker and wait for all of them to acknowledge; returns the byte count."""
        items = [(n, t.detach()) for n, t in named_tensors]
        metas = [{"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for n, t in items]
        for meta in metas:
            if meta["dtype"] not in _DTYPES:
                raise WeightSyncError(f"weight sync: tensor {meta['name']!r} has dtype torch.{meta['dtype']}, which "
                                      "is not sent")
        self.version = self.version + 1 if version is None else version
        buckets = self.buckets(metas)
        self._header({"op": "weights", "version": self.version, "tensors": metas, "buckets": buckets})
        sent = 0
        for bucket in buckets:
            flat = torch.cat([items[i][1].reshape(-1).to(self.device) for i in bucket])
            self.broadcast(flat, f"tensor {metas[bucket[0]]['name']!r}" + (f" (+{len(bucket) - 1} more)"
                                                                            if len(bucket) > 1 else ""))
            sent += flat.numel() * flat.element_size()
        ack = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.all_reduce(ack, "the acknowledgement")
        if int(ack.item()) != self.cfg.world_size - 1:
            raise WeightSyncError(f"weight sync: {int(ack.item())} of {self.cfg.world_size - 1} workers applied "
                                  f"version {self.version}")
        return sent

    def close(self) -> None:
        """Tell the workers to leave the group, and leave it."""
        try:
            self._header({"op": "close"})
        finally:
            self.shutdown()


class WeightReceiver(_Group):
    """A rollout worker's side (rank 1..N)."""

    def __init__(self, cfg: SyncGroupConfig, rank: int = 1, device=None):
        if not 1 <= rank < cfg.world_size:
            raise ValueError(f"a weight receiver's rank must be in [1, {cfg.world_size - 1}], got {rank}")
        super().__init__(cfg, rank, device)
        self.version = 0

    @torch.no_grad()
    def receive(self, apply: Callable[[list[tuple[str, torch.Tensor]]], None]) -> int | None:
        """Receive one sync and ``apply`` the named tensors; returns its version (None: the sender closed)."""
        header = self._header(None)
        if header.get("op") == "close":
            self.shutdown()
            return None
        metas = header["tensors"]
        received: list[tuple[str, torch.Tensor]] = []
        for bucket in header["buckets"]:  # the sender's bucketing, whatever this side's bucket_bytes
            dtype = _DTYPES[metas[bucket[0]]["dtype"]]
            sizes = [math.prod(metas[i]["shape"]) for i in bucket]
            flat = torch.empty(sum(sizes), dtype=dtype, device=self.device)
            self.broadcast(flat, f"tensor {metas[bucket[0]]['name']!r}")
            for i, part in zip(bucket, flat.split(sizes), strict=True):
                received.append((metas[i]["name"], part.view(metas[i]["shape"])))
        ok = 1
        try:
            apply(received)
        except Exception:
            ok = 0  # the sender learns that this worker failed; the error is raised here after the acknowledgement
            raise
        finally:
            self.all_reduce(torch.tensor([ok], dtype=torch.int64, device=self.device), "the acknowledgement")
        self.version = int(header["version"])
        return self.version
