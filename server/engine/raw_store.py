"""Raw P and gates of every adapter resident in a worker: what the file holds, ~3.4 KB for SmolLM2 N = 1.

The slot table's hot tier keeps per-layer K_p/V_p for a few adapters; this store keeps every resident
adapter in its raw form, so the cold ones cost only their own parameters and are projected on the fly
(see `AdapterTable.stage`). Storage is chunked pools per token count N, grown as adapters arrive, so a
large capacity costs nothing until it is used.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 4096  # adapters per pool chunk


class _Pool:
    """Fixed-shape rows for adapters with one token count N."""

    def __init__(self, n: int, hidden: int, gate_shape: tuple[int, int], *, device: torch.device, dtype: torch.dtype):
        self.n, self.hidden, self.gate_shape = n, hidden, gate_shape
        self.device, self.dtype = device, dtype
        self.prefix: list[torch.Tensor] = []  # chunks of [CHUNK, N, hidden], the model's dtype
        self.gate: list[torch.Tensor] = []  # chunks of [CHUNK, L, H] float32, after activation
        self.free: list[int] = []
        self.next = 0

    def alloc(self) -> int:
        if self.free:
            return self.free.pop()
        row = self.next
        if row // CHUNK == len(self.prefix):
            # Uninitialised on purpose: a row is read only after `RawStore.add` wrote all of it, and zeroing
            # would touch every page of the chunk at once (N = 16: 151 MB, ~0.4 s of page faults inside the
            # first upload of that N); untouched pages cost nothing until their rows are used.
            self.prefix.append(torch.empty(CHUNK, self.n, self.hidden, device=self.device, dtype=self.dtype))
            self.gate.append(torch.empty(CHUNK, *self.gate_shape, device=self.device, dtype=torch.float32))
        self.next += 1
        return row

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.prefix, *self.gate))


class RawStore:
    """key -> raw index; raw index -> (P [N, hidden], gates [L, H]). At most `capacity` adapters."""

    def __init__(self, capacity: int, gate_shape: tuple[int, int], *, device: torch.device, dtype: torch.dtype):
        self.capacity = capacity
        self.gate_shape = gate_shape  # [L, H]: every layer (zeros below start_layer), this rank's heads
        self.device, self.dtype = device, dtype
        self._index: dict[str, int] = {}
        self._free: list[int] = []
        self._next = 0
        self.ntok = np.zeros(0, dtype=np.int32)  # raw index -> N (0 = free)
        self.row = np.zeros(0, dtype=np.int64)  # raw index -> row in its pool
        self._pools: dict[int, _Pool] = {}

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def index(self, key: str) -> int | None:
        return self._index.get(key)

    def full(self) -> bool:
        return len(self._index) >= self.capacity

    def add(self, key: str, prefix: torch.Tensor, gates: torch.Tensor) -> int:
        """prefix: [N, hidden]; gates: [L, H] after activation. Returns the raw index."""
        if self.full():
            raise RuntimeError(f"raw store full ({self.capacity})")
        n, hidden = prefix.shape
        pool = self._pools.get(n)
        if pool is None:
            pool = self._pools[n] = _Pool(n, hidden, self.gate_shape, device=self.device, dtype=self.dtype)
        row = pool.alloc()
        pool.prefix[row // CHUNK][row % CHUNK] = prefix.to(device=self.device, dtype=self.dtype)
        pool.gate[row // CHUNK][row % CHUNK] = gates.to(device=self.device, dtype=torch.float32)
        c = self._free.pop() if self._free else self._grow()
        self.ntok[c], self.row[c] = n, row
        self._index[key] = c
        return c

    def remove(self, key: str) -> None:
        c = self._index.pop(key)
        self._pools[int(self.ntok[c])].free.append(int(self.row[c]))
        self.ntok[c] = 0
        self._free.append(c)

    def fetch(self, cs: list[int]) -> dict[int, tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Raw indexes -> per N: (positions in `cs`, P [U_n, N, hidden], gates [U_n, L, H])."""
        groups: dict[int, list[int]] = {}
        for pos, c in enumerate(cs):
            groups.setdefault(int(self.ntok[c]), []).append(pos)
        out = {}
        for n, positions in groups.items():
            pool = self._pools[n]
            rows = [int(self.row[cs[p]]) for p in positions]
            prefix = torch.stack([pool.prefix[r // CHUNK][r % CHUNK] for r in rows])
            gates = torch.stack([pool.gate[r // CHUNK][r % CHUNK] for r in rows])
            out[n] = (positions, prefix, gates)
        return out

    def nbytes(self) -> int:
        index = self.ntok.nbytes + self.row.nbytes
        return index + sum(p.nbytes() for p in self._pools.values())

    def _grow(self) -> int:
        c = self._next
        if c >= len(self.ntok):
            size = min(self.capacity, max(1024, 2 * len(self.ntok)))
            self.ntok = np.concatenate([self.ntok, np.zeros(size - len(self.ntok), dtype=np.int32)])
            self.row = np.concatenate([self.row, np.zeros(size - len(self.row), dtype=np.int64)])
        self._next += 1
        return c
