"""torch.distributed plumbing: which group, the ring's point-to-point exchange, and the check
that every rank called with consistent inputs.

Everything goes through torch.distributed (NCCL on GPUs, gloo on CPUs); no other transport.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """A resolved process group: this process's rank in it, its size, and its members' global ranks."""

    pg: object  # dist.ProcessGroup
    rank: int
    size: int
    members: tuple[int, ...]

    @property
    def next(self) -> int:
        return self.members[(self.rank + 1) % self.size]

    @property
    def prev(self) -> int:
        return self.members[(self.rank - 1) % self.size]


def resolve_group(group, name: str = "group") -> Group:
    """``None`` (the default group), a ``ProcessGroup`` or a 1-D ``DeviceMesh`` (e.g. ``mesh["cp"]``)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{name}: torch.distributed is not initialized; call torch.distributed.init_process_group() first "
            "(NCCL on GPUs, gloo on CPUs), e.g. by launching with torchrun"
        )
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without DeviceMesh
        DeviceMesh = ()
    if DeviceMesh and isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"{name}: expected a 1-D DeviceMesh (the context-parallel dimension, e.g. mesh['cp']), "
                f"got a {group.ndim}-D mesh with dimensions {group.mesh_dim_names}"
            )
        group = group.get_group()
    elif group is None:
        group = dist.group.WORLD
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name}: expected None, a torch.distributed ProcessGroup or a 1-D DeviceMesh, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member of the group")
    size = dist.get_world_size(group)
    members = tuple(dist.get_global_rank(group, r) for r in range(size))
    return Group(group, rank, size, members)


def digest(*values) -> int:
    """A number every rank computes identically from the same arguments (Python's hash() of a str
    differs between processes), to check that all ranks passed the same scalar arguments."""
    return zlib.crc32(repr(values).encode()) & 0x7FFFFFFF


def exchange_metadata(g: Group, local: Sequence[int], device: torch.device) -> list[list[int]]:
    """All ranks' small integer vectors (one all-gather of int64 on ``device``; a host sync)."""
    t = torch.tensor(list(local), dtype=torch.int64, device=device)
    out = torch.empty(g.size * t.numel(), dtype=torch.int64, device=device)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, t, group=g.pg)
    return out.view(g.size, -1).tolist()


def agree(g: Group, device: torch.device, local: Sequence[int], error: Optional[BaseException], what: str):
    """Exchange ``local`` metadata with every rank, first raising on ALL ranks if any rank's
    inputs were rejected locally (so a bad input on one rank is an error everywhere, never a hang
    of the others in the next collective). Returns every rank's vector."""
    rows = exchange_metadata(g, [0 if error is None else 1, *local], device)
    bad = [r for r, row in enumerate(rows) if row[0]]
    if error is not None:
        raise error
    if bad:
        raise ValueError(f"{what}: rank(s) {bad} of the group rejected their inputs (see the error raised there)")
    return [row[1:] for row in rows]


class Ring:
    """Each rank sends a block to the next rank and receives one from the previous, asynchronously.

    ``start`` issues every send and receive as one ``batch_isend_irecv`` (NCCL runs them on its
    own stream, gloo on its own threads) and returns at once, so the caller computes on the current
    block meanwhile; ``wait`` makes the current stream wait for the received blocks. Empty blocks
    are skipped on both sides (both know every block's size).
    """

    def __init__(self, g: Group):
        self.g = g

    def start(self, send: Sequence[torch.Tensor], recv_shapes: Sequence[tuple], dtype_of: Sequence[torch.dtype],
              device) -> "_Pending":
        ops, received = [], []
        for t in send:
            if t.numel():
                ops.append(dist.P2POp(dist.isend, t, self.g.next, self.g.pg))
        for shape, dtype in zip(recv_shapes, dtype_of):
            buf = torch.empty(shape, dtype=dtype, device=device)
            received.append(buf)
            if buf.numel():
                ops.append(dist.P2POp(dist.irecv, buf, self.g.prev, self.g.pg))
        works = dist.batch_isend_irecv(ops) if ops else []
        return _Pending(works, received, list(send))


class _Pending:
    def __init__(self, works, received, sent):
        self.works, self.received, self._sent = works, received, sent  # keep sent buffers alive until done

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        self.works, self._sent = [], []
        return self.received
