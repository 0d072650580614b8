"""On CPU, give the engine's workers their cores to themselves.

vLLM's CPU worker binds its compute threads to a set of cores and leaves the others to "the frontend",
but nothing keeps the frontend there: the API process and the engine core (which polls the workers'
queue in a spin-and-yield loop between steps) can still be scheduled onto a worker's core and take turns
with it. On the 2-core development machine the worker then got about 94% of its core, and the time of
one decode step moved by about +-5% from run to run; with the rest of the engine moved to the other
core, the worker gets all of its core.
"""

from __future__ import annotations

import logging
import os

import psutil

log = logging.getLogger(__name__)


def isolate_worker_cores(root_pid: int | None = None) -> list[int] | None:
    """Move every process of the engine tree under `root_pid` (default: this one), except the workers
    vLLM bound to cores, onto the cores no worker uses. Returns those cores, or None when there is
    nothing to do: no bound worker (GPU workers are not bound), or workers on every core. The engine's
    `stop` gives this process its cores back (`restore_cores`)."""
    root = psutil.Process(root_pid)
    allowed = set(root.cpu_affinity())
    tree = [root, *root.children(recursive=True)]
    workers = [p for p in tree[1:] if _affinity(p) < allowed]  # bound by vLLM's CPU worker
    if not workers:
        return None
    taken = set().union(*(_affinity(p) for p in workers))
    rest = sorted(allowed - taken)
    if not rest:
        return None
    for p in tree:
        if p not in workers:
            _pin_threads(p, rest)
    log.info("engine workers run on cores %s; the API process and the engine core on %s", sorted(taken), rest)
    return rest


def restore_cores(cores: set[int]) -> None:
    """Give every thread of this process `cores` again (the engine stopped; its workers are gone)."""
    _pin_threads(psutil.Process(), cores)


def _pin_threads(p: psutil.Process, cores) -> None:
    """Affinity is per thread; threads started later inherit their creator's."""
    try:
        threads = p.threads()
    except psutil.Error:
        return  # gone, or not ours
    for t in threads:
        try:
            os.sched_setaffinity(t.id, cores)
        except OSError:
            pass  # the thread ended meanwhile


def _affinity(p: psutil.Process) -> set[int]:
    try:
        return set(p.cpu_affinity())
    except psutil.Error:
        return set()
