"""The Aligner term's kernels: one interface, one module each, chosen by a small registry.

Every kernel adds, in place, for each token t of a forward whose slot s = tok_slot[t] is > 0 and each query
head h = kvh * G + g of one adapted layer,

    out[t, h] += gate[s, kvh, g] * softmax_n(q[t, h] . K[s, kvh, n] * scale + mask[s, n]) @ V[s, kvh, n]

over the first `step.max_tokens` prefix keys, reading the layer straight from the `AdapterTable`; tokens of
slot 0 get exactly nothing. The interface (`Kernel`) is one call per adapted layer, `add(out, q, layer,
step)`, with the forward's `StepPlan` (the same object for every layer of one forward). Kernels:

- `torch` (`kernels/torch.py`): the general path in torch ops, the reference twin of the others; graph-safe.
- `triton` (`kernels/triton.py`): one fused launch per layer on CUDA; graph-safe.
- `cpu` (`kernels/cpu.py` + `cpu_kernel.c`): the fused C kernel on CPU, built at first use; it checks a
  forward's layout once, at its first layer.

Graph-safe: no host sync and no geometry that depends on the routing or the table's contents, so a launch
captured in a CUDA graph is right at replay (op.py's graph-safe mode).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from server.engine.routing import StepPlan
    from server.engine.table import AdapterTable

log = logging.getLogger(__name__)

# auto: Triton on CUDA where triton runs, the C kernel on CPU where it builds, else torch; the others: always
# that kernel (refused at start where it cannot run)
PATHS = ("auto", "torch", "triton", "cpu")


class Kernel(Protocol):
    name: str
    graph_safe: bool

    def add(self, out: torch.Tensor, q: torch.Tensor, layer: int, step: StepPlan) -> None:
        """out: [T, H*D] attention output before o_proj, updated in place; q: [T, H*D] post-RoPE queries."""
        ...


class LayerLaunch:
    """A kernel that is one call per layer with the Triton kernel's signature (`launch`): the torch and
    Triton kernels. Graph-safe: it reads only the step's device slots and fixed table slices."""

    name = ""
    graph_safe = True
    launch: Callable[..., torch.Tensor]  # (out, q, tok_slot, k_layer, v_layer, mask, gate_layer, scale, n)

    def __init__(self, table: AdapterTable, scale: float) -> None:
        self.table, self.scale = table, scale

    def add(self, out: torch.Tensor, q: torch.Tensor, layer: int, step: StepPlan) -> None:
        t = self.table
        self.launch(out, q, step.tok_slot, t.k[layer], t.v[layer], t.mask, t.gate[layer], self.scale, step.max_tokens)


def make(name: str, table: AdapterTable, scale: float) -> Kernel:
    """The kernel `name` ("torch", "triton" or "cpu") bound to `table`."""
    if name == "torch":
        from server.engine.kernels.torch import TorchKernel

        return TorchKernel(table, scale)
    if name == "triton":
        from server.engine.kernels.triton import TritonKernel

        return TritonKernel(table, scale)
    if name == "cpu":
        from server.engine.kernels.cpu import CpuKernel

        return CpuKernel(table, scale)
    raise ValueError(f"unknown Aligner kernel {name!r}; one of torch, triton, cpu")


def choose(path: str, device: torch.device, dtype: torch.dtype, head_dim: int, max_tokens: int) -> str:
    """The kernel for `path` (the ALIGNER_KERNEL_PATH setting) on this device and model: an explicit kernel
    must be able to run (else RuntimeError, saying why); "auto" takes the fastest that can, and says on CPU
    when the C kernel cannot (the torch kernel is slower)."""
    if path not in PATHS:
        raise ValueError(f"unknown Aligner kernel path {path!r}; one of {PATHS}")
    if path == "torch":
        return "torch"
    from server.engine.kernels import cpu, triton

    if path in ("auto", "triton"):
        can = device.type == "cuda" and triton.triton_available()
        if can:
            return "triton"
        if path == "triton":
            raise RuntimeError("the Aligner kernel path 'triton' needs a CUDA device and the triton package")
    why = (
        "the CPU kernel runs on CPU devices only" if device.type != "cpu" else cpu.supports(dtype, head_dim, max_tokens)
    )
    if why is None:
        try:
            cpu.load()
        except cpu.KernelUnavailable as e:
            why = str(e)
    if why is None:
        return "cpu"
    if path == "cpu":
        raise RuntimeError(f"the Aligner kernel path 'cpu' cannot run: {why}")
    if device.type == "cpu":
        log.warning("Aligner: using the torch kernel on CPU (slower): %s", why)
    return "torch"
