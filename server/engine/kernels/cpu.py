"""The fused CPU kernel for the Aligner term (`cpu_kernel.c`), built with the system C compiler at first use.

On CPU the torch paths are bound by per-op overhead: a decode step with 64 distinct adapters runs about a
dozen tiny batched products per layer. The kernel does the whole term in one pass per token and adds it
into the attention output in place. It is compiled once per machine (`-O3 -march=native`) into a cache
directory and loaded with ctypes; without a C compiler the op keeps its torch paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from server.engine.routing import StepPlan
    from server.engine.table import AdapterTable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernel.c")
# -ffast-math only when compiling (vectorised reductions, glibc's vector expf); the link step goes without
# it, because linking with it adds crtfastmath.o, which sets flush-to-zero for the whole process at load.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MAX_D, MAX_N = 256, 64  # as in cpu_kernel.c

_P, _I = ctypes.c_void_p, ctypes.c_int64
_lib: ctypes.CDLL | None = None
_error: str | None = None


class KernelUnavailable(RuntimeError):
    """The C kernel cannot be built or loaded on this machine."""


def cache_dir() -> Path:
    """ALIGNER_KERNEL_CACHE, else the user's cache directory, else a temporary one."""
    explicit = os.environ.get("ALIGNER_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aligner-serve" / "kernels"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise KernelUnavailable("no C compiler (cc or gcc) on PATH; set CC or install gcc")
    return cc


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("flags", "model name"))}))
    except OSError:
        return platform.processor()


def build(directory: Path | None = None, defines: tuple[str, ...] = ()) -> Path:
    """Compile the kernel (or find it compiled) and return the shared library's path. `defines` are
    preprocessor symbols: ALIGNER_PORTABLE leaves out the AVX-512 body (the tests build both)."""
    cc = _compiler()
    src = SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"C compiler {cc!r} does not run: {e}") from e
    flags = FLAGS + [f"-D{d}" for d in defines]
    key = hashlib.sha256(
        b"\0".join([src, " ".join(flags + ["link:-shared -lm"]).encode(), version.encode(), _cpu_identity().encode()])
    )
    name = f"aligner_cpu_{key.hexdigest()[:16]}.so"
    for place in (directory or cache_dir(), Path(tempfile.gettempdir()) / f"aligner-serve-kernels-{os.getuid()}"):
        try:
            place.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _trusted(place):
                continue  # a library there could have been planted by another user
            target = place / name
            if target.exists():
                return target
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=place)
        except OSError:
            continue  # not writable: the next place
        os.close(fd)
        # Workers (tensor-parallel ranks) may build at once: each writes its own file, then renames it.
        try:
            obj = tmp + ".o"
            for step in ([cc, *flags, "-c", "-o", obj, str(SOURCE)], [cc, "-shared", "-o", tmp, obj, "-lm"]):
                done = subprocess.run(step, capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    raise KernelUnavailable(f"compiling {SOURCE.name} failed:\n{done.stderr.strip()}")
            os.replace(tmp, target)
        finally:
            for leftover in (tmp, tmp + ".o"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        return target
    raise KernelUnavailable(
        f"no private writable directory for the compiled kernel (tried {directory or cache_dir()} and the temp dir)"
    )


def _trusted(place: Path) -> bool:
    """Ours and writable only by us: the only kind of directory we load compiled code from."""
    st = place.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def load() -> ctypes.CDLL:
    """The loaded kernel library (built once per process); KernelUnavailable says why it cannot be had."""
    global _lib, _error
    if _lib is not None:
        return _lib
    if _error is not None:
        raise KernelUnavailable(_error)
    try:
        _lib = open_library(build())
    except (KernelUnavailable, OSError, subprocess.SubprocessError) as e:
        _error = str(e)
        raise KernelUnavailable(_error) from e
    return _lib


class _Table(ctypes.Structure):  # aligner_table in cpu_kernel.c
    _fields_ = (
        [("k", _P), ("v", _P), ("gate", _P), ("ntok", _P)]
        + [(n, _I) for n in ("L", "S", "KVH", "G", "Nm", "D", "kv_dtype")]
        + [("scale", ctypes.c_float)]
    )


class _Step(ctypes.Structure):  # aligner_step
    _fields_ = [
        ("table", ctypes.POINTER(_Table)),
        ("tok_slot", _P),
        *[(n, _I) for n in ("T", "n_cap", "q_row", "out_row", "dtype", "checked")],
    ]


def open_library(path: Path) -> ctypes.CDLL:
    """A built kernel library with its functions typed."""
    # PyDLL keeps the GIL through each call: a call is tens of microseconds, and releasing the GIL
    # lets another worker thread take it, after which re-acquiring can wait a whole switch interval.
    lib = ctypes.PyDLL(str(path))
    lib.aligner_begin.restype = ctypes.c_int
    lib.aligner_begin.argtypes = [ctypes.POINTER(_Step)]
    # Plain integers for the per-layer call: ctypes converts an int64 cheaper than a pointer or a float,
    # and this call runs 30 times a forward with cold caches.
    lib.aligner_layer.restype = ctypes.c_int
    lib.aligner_layer.argtypes = [_I] * 4
    lib.aligner_simd_width.restype = ctypes.c_int
    lib.aligner_simd_width.argtypes = []
    return lib


def supports(dtype: torch.dtype, head_dim: int, max_tokens: int) -> str | None:
    """None when the kernel takes this model, else why not."""
    if dtype not in DTYPES:
        return f"the CPU kernel takes float32 and bfloat16, not {dtype}"
    return _beyond_limits(head_dim, max_tokens)


def _beyond_limits(head_dim: int, max_tokens: int) -> str | None:
    if head_dim > MAX_D or max_tokens > MAX_N:
        return f"the CPU kernel takes head_dim <= {MAX_D} and N <= {MAX_N}"
    return None


class BoundKernel:
    """The kernel bound to one adapter table. Shapes are checked and layer pointers taken once; a forward
    is checked once in `begin`, then each layer's `layer` call passes four integers."""

    def __init__(
        self,
        k: torch.Tensor,  # [L, S, KVH, Nm, D] float32 or bfloat16, the table's K_p
        v: torch.Tensor,  # [L, S, KVH, Nm, D], same dtype
        gate: torch.Tensor,  # [L, S, KVH, G] float32
        ntok: np.ndarray,  # [S] int64 N of each slot, updated in place by the table
        scale: float,
        lib: ctypes.CDLL | None = None,  # another build of the kernel (tests); default: `load()`
    ) -> None:
        L, S, KVH, Nm, D = k.shape
        if k.dtype not in DTYPES or v.dtype != k.dtype or gate.dtype != torch.float32:
            raise ValueError(
                f"the CPU kernel takes a float32 or bfloat16 table with float32 gates, not {k.dtype}/{gate.dtype}"
            )
        if k.device.type != "cpu" or not all(x.is_contiguous() for x in (k, v, gate)):
            raise ValueError("the CPU kernel needs a contiguous table on the CPU")
        if v.shape != k.shape or gate.shape[:3] != (L, S, KVH):
            raise ValueError(f"table shapes disagree: k {tuple(k.shape)}, v {tuple(v.shape)}, gate {tuple(gate.shape)}")
        if ntok.dtype != np.int64 or not ntok.flags.c_contiguous or ntok.shape != (S,):
            raise ValueError("ntok must be a contiguous int64 array with one entry per slot")
        why = _beyond_limits(D, Nm)
        if why:
            raise ValueError(why)
        lib = lib or load()
        self._keep = (k, v, gate, ntok)  # the table's pointers stay valid while these live
        self._table = _Table(
            k.data_ptr(),
            v.data_ptr(),
            gate.data_ptr(),
            ntok.ctypes.data,
            L,
            S,
            KVH,
            gate.shape[3],
            Nm,
            D,
            DTYPES[k.dtype],
            scale,
        )
        self._step = _Step(ctypes.pointer(self._table))
        self._step_addr = ctypes.addressof(self._step)
        self._begin, self._layer = lib.aligner_begin, lib.aligner_layer
        self._tok: np.ndarray | None = None  # the begun step's token slots (the step points into it)
        self.num_slots = S
        self.width = KVH * gate.shape[3] * D  # H*D

    def begin(
        self,
        out: torch.Tensor,  # [T, H*D] attention output (float32 or bfloat16); rows may be strided
        q: torch.Tensor,  # [T, H*D] post-RoPE queries, same dtype (in vLLM a view into the fused qkv output)
        tok_slot: np.ndarray,  # [T'] int64 slot of each token (0 = no adapter), T' >= T
        max_tokens: int,  # the step's largest N
    ) -> None:
        """Check a forward's layout and token slots once; every `layer` call until the next `begin` must pass
        tensors of this layout (in a forward, every attention layer's out and q have it)."""
        self._step.checked = 0
        code = DTYPES.get(out.dtype)
        if code is None or q.dtype != out.dtype or q.shape != out.shape or out.dim() != 2 or out.shape[1] != self.width:
            raise ValueError(f"the CPU kernel got out {tuple(out.shape)} {out.dtype}, q {tuple(q.shape)} {q.dtype}")
        T = out.shape[0]
        if T and (out.stride(1) != 1 or q.stride(1) != 1):
            raise ValueError("the CPU kernel needs rows of dense [H*D] elements")
        if tok_slot.dtype != np.int64 or not tok_slot.flags.c_contiguous or len(tok_slot) < T:
            raise ValueError("tok_slot must be a contiguous int64 array with one entry per token")
        st = self._step
        self._tok = tok_slot
        st.tok_slot, st.T, st.n_cap, st.q_row, st.out_row, st.dtype = (
            tok_slot.ctypes.data,
            T,
            max_tokens,
            q.stride(0),
            out.stride(0),
            code,
        )
        rc = self._begin(st)
        if rc == -2:
            raise ValueError(f"a token's slot is outside the table's {self.num_slots} slots")
        if rc != 0:
            raise ValueError(f"the CPU kernel refused this step (N {max_tokens}, {out.dtype})")

    def layer(self, out: torch.Tensor, q: torch.Tensor, layer: int) -> None:
        """out += the Aligner term of `layer`, for the begun step (the engine's per-layer call)."""
        if self._layer(self._step_addr, out.data_ptr(), q.data_ptr(), layer) != 0:
            raise ValueError(f"the CPU kernel has no begun step or no layer {layer}")

    def __call__(self, out: torch.Tensor, q: torch.Tensor, tok_slot: np.ndarray, layer: int, max_tokens: int) -> None:
        """out += the Aligner term of `layer` (begin and layer in one)."""
        self.begin(out, q, tok_slot, max_tokens)
        self.layer(out, q, layer)


def aligner_apply(
    out: torch.Tensor,  # [T, H*D]
    q: torch.Tensor,  # [T, H*D]
    tok_slot: np.ndarray,  # [T] int64
    k: torch.Tensor,  # [S, KVH, Nm, D] float32 or bfloat16, one layer of a table
    v: torch.Tensor,  # [S, KVH, Nm, D]
    gate: torch.Tensor,  # [S, KVH, G]
    ntok: np.ndarray,  # [S] int64
    scale: float,
    max_tokens: int,
    lib: ctypes.CDLL | None = None,
) -> None:
    """out += the Aligner term for one layer's tensors (a one-layer `BoundKernel`)."""
    BoundKernel(k[None], v[None], gate[None], ntok, scale, lib)(out, q, tok_slot, 0, max_tokens)


class CpuKernel:
    """The C kernel bound to a table: a forward's layout and token slots are checked at its first layer (its
    attention layers all give out and q the same layout), then each layer is one call."""

    name = "cpu"
    graph_safe = False  # there are no CUDA graphs on a CPU

    def __init__(self, table: AdapterTable, scale: float) -> None:
        self._bound = BoundKernel(table.k, table.v, table.gate, table.ntok, scale)
        self._step: StepPlan | None = None  # the forward begun; held, so its token slots stay alive

    def add(self, out: torch.Tensor, q: torch.Tensor, layer: int, step: StepPlan) -> None:
        if step is not self._step:
            if step.tok_slot_host is None:
                raise ValueError("the CPU kernel reads the token slots on the host; this step has none")
            self._bound.begin(out, q, step.tok_slot_host, step.max_tokens)
            self._step = step
        self._bound.layer(out, q, layer)
