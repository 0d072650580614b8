"""Core placement on CPU: real processes, pinned and unpinned, under a real root process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from server.engine.placement import isolate_worker_cores, restore_cores

# A root that starts a "worker" bound to core 0 (as vLLM's CPU worker binds itself) and an unbound child
# (as the engine core), then waits.
TREE = """
import os, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import os, time; os.sched_setaffinity(0, {0}); time.sleep(60)"])
other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(worker.pid, other.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def tree():
    root = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    worker, other = (psutil.Process(int(x)) for x in root.stdout.readline().split())
    deadline = time.monotonic() + 10
    while worker.cpu_affinity() != [0] and time.monotonic() < deadline:
        time.sleep(0.05)
    yield psutil.Process(root.pid), worker, other
    for p in (worker, other):
        p.kill()
    root.kill()
    root.wait()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_the_engine_tree_leaves_the_bound_workers_core_alone(tree) -> None:
    root, worker, other = tree
    allowed = set(root.cpu_affinity())
    assert isolate_worker_cores(root.pid) == sorted(allowed - {0})
    for p in (root, other):
        assert all(0 not in os.sched_getaffinity(t.id) for t in p.threads())
    assert worker.cpu_affinity() == [0]  # the worker itself is left as vLLM bound it


def test_nothing_moves_without_a_bound_worker() -> None:
    root = subprocess.Popen(
        [sys.executable, "-c", TREE.replace("os.sched_setaffinity(0, {0}); ", "")], stdout=subprocess.PIPE, text=True
    )
    children = [psutil.Process(int(x)) for x in root.stdout.readline().split()]
    try:
        before = [p.cpu_affinity() for p in children]
        assert isolate_worker_cores(root.pid) is None  # GPU engines: no worker is bound
        assert [p.cpu_affinity() for p in children] == before
    finally:
        for p in children:
            p.kill()
        root.kill()
        root.wait()


def test_restore_gives_every_thread_its_cores_back() -> None:
    import threading

    before = os.sched_getaffinity(0)
    if len(before) < 2:
        pytest.skip("needs two cores")
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        for t in psutil.Process().threads():
            os.sched_setaffinity(t.id, {min(before)})
        restore_cores(before)
        assert all(os.sched_getaffinity(t.id) == before for t in psutil.Process().threads())
    finally:
        stop.set()
        helper.join()
        restore_cores(before)
