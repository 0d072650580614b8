"""The training worker: takes fine-tuning jobs from the store's queue and runs them, one at a time.

    aligner fine-tune worker            # beside a server, or on another machine against the same store
    python -m server.finetune_worker    # the same; `aligner serve` starts ALIGNER_FINETUNE_WORKERS of these

Its own process, so serving never waits on training; it trains with ALIGNER_FINETUNE_THREADS torch threads
on ALIGNER_FINETUNE_DEVICE. Settings come from the same ALIGNER_* variables as the server's.

A job's life here:
1. `claim_job` hands over the oldest queued job (PostgreSQL: FOR UPDATE SKIP LOCKED, so replicas sharing a
   store never run one job twice) and first requeues the running jobs whose worker went silent.
2. The trainer (training.train, the same as `aligner train`) runs in a thread. Every step it reports a
   `metrics` event; the loop here sends them with a heartbeat that renews the lease every
   lease/4 seconds and reads the cancel flag.
3. The end is one transaction (`finish_job`): succeeded stores the adapter for the job's tenant, or failed
   with the reason, or cancelled.
Stopping (SIGTERM, the server shutting down) hands the running job back to the queue (`release_job`). A
worker that is killed outright loses its lease, and the next claim after `ALIGNER_FINETUNE_LEASE_SECONDS`
queues the job again, or fails it (`worker_lost`) after `ALIGNER_FINETUNE_MAX_ATTEMPTS` claims. A worker
whose lease was taken over (`LeaseLost`) stops and writes nothing more.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from adapters_store import (
    JobRecord,
    LeaseLost,
    NewAdapter,
    NewCheckpoint,
    NewJobEvent,
    NotFound,
    QuotaExceeded,
    Store,
    StoreError,
    open_store,
)
from server.fine_tuning import adapter_name
from server.settings import Settings
from server.training_files import parse, to_jsonl

log = logging.getLogger("aligner.finetune")
POLL_SECONDS = 1.0


class Interrupted(Exception):
    """Raised inside the trainer's step callback to end a run early (cancel, stop, lost lease)."""


class Control:
    """What the training thread and the worker's loop share: flags one way, events the other."""

    def __init__(self) -> None:
        self.cancel, self.stop, self.lost = threading.Event(), threading.Event(), threading.Event()
        self._events: list[NewJobEvent] = []
        self._lock = threading.Lock()
        self.last: dict = {}  # the last step's figures (the checkpoint's metrics)
        self.started = time.perf_counter()

    def on_step(self, record: dict) -> None:
        """training.train's OnStep: one `metrics` event per step, the validation loss merged into it."""
        if self.cancel.is_set() or self.stop.is_set() or self.lost.is_set():
            raise Interrupted
        step, total = record["step"], record["steps"]
        with self._lock:
            if "val_loss" in record:
                self.last["valid_loss"] = record["val_loss"]
                if self._events and self._events[-1].data and self._events[-1].data["step"] == step:
                    prev = self._events.pop()
                    data = {**(prev.data or {}), "valid_loss": record["val_loss"]}
                    message = f"{prev.message}, validation loss={record['val_loss']:.4f}"
                    self._events.append(NewJobEvent(message, type="metrics", data=data))
                return
            data = {"step": step, "total_steps": total, "train_loss": record["loss"], "learning_rate": record["lr"]}
            if "reward_acc" in record:
                data["train_reward_accuracy"] = record["reward_acc"]
            self.last = {**data}
            message = f"Step {step}/{total}: training loss={record['loss']:.4f}"
            self._events.append(NewJobEvent(message, type="metrics", data=data))

    def take(self, *, final: bool = False) -> list[NewJobEvent]:
        """The events to send; the last step's is held back (its validation loss may follow) unless `final`."""
        with self._lock:
            keep = 0 if final or not self._events else 1
            out, self._events = self._events[: len(self._events) - keep], self._events[len(self._events) - keep :]
        return out

    def put_back(self, events: list[NewJobEvent]) -> None:
        """Events a failed heartbeat did not deliver go first next time."""
        with self._lock:
            self._events[:0] = events


def training_config(job: JobRecord, settings: Settings, folder: Path, train_path: Path, val_path: Path | None):
    from training.train import TrainConfig

    s = job.spec
    return TrainConfig(
        data=str(train_path),
        output=str(folder / "adapter.safetensors"),
        model=settings.model,
        cache_dir=str(settings.cache_dir),
        method="sft" if s["method"] == "supervised" else "dpo",
        tokens=s["tokens"],
        start_layer=s["start_layer"],
        gate_activation=s["gate_activation"],
        lr=s["lr"],
        steps=s["steps"],
        batch_size=s["batch_size"],
        seed=s["seed"],
        val_split=0.0,  # as OpenAI: a validation loss only from a validation file
        val_data=str(val_path) if val_path else None,
        beta=s["beta"] or 0.1,
        device=settings.finetune_device,
        log=str(folder / "log.json"),
        plot="",
        quiet=True,
    )


class Worker:
    def __init__(self, store: Store, settings: Settings, worker_id: str | None = None) -> None:
        self.store, self.settings = store, settings
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.stopping = asyncio.Event()
        self.control: Control | None = None

    def stop(self) -> None:
        """Finish soon: the running job goes back to the queue (from a signal handler too)."""
        self.stopping.set()
        if self.control is not None:
            self.control.stop.set()

    async def run(self) -> None:
        log.info("training worker %s: taking jobs (lease %ss)", self.id, self.settings.finetune_lease_seconds)
        while not self.stopping.is_set():
            try:
                job = await self.store.claim_job(
                    self.id,
                    lease_s=self.settings.finetune_lease_seconds,
                    max_attempts=self.settings.finetune_max_attempts,
                )
            except StoreError as e:
                log.warning("training worker %s: cannot claim a job (%s); retrying", self.id, e)
                job = None
            if job is None:
                try:
                    await asyncio.wait_for(self.stopping.wait(), POLL_SECONDS)
                except TimeoutError:
                    pass
                continue
            await self.run_job(job)

    async def _file(self, job: JobRecord, file_id: str, folder: Path, name: str) -> Path:
        path = folder / name
        path.write_text(to_jsonl(parse(await self.store.get_file_content(job.tenant_id, file_id)).rows))
        return path

    async def run_job(self, job: JobRecord) -> None:
        log.info("job %s (tenant %s): started, attempt %d", job.id, job.tenant_id, job.attempts)
        from training.train import train

        ctl = self.control = Control()
        with tempfile.TemporaryDirectory(prefix="aligner-ft-") as tmp:
            folder = Path(tmp)
            try:
                train_path = await self._file(job, job.training_file, folder, "train.jsonl")
                val_path = (
                    await self._file(job, job.validation_file, folder, "val.jsonl") if job.validation_file else None
                )
            except NotFound:
                await self._finish(job, "failed", error=_error("file_not_found", "a file of the job was deleted"))
                return
            cfg = training_config(job, self.settings, folder, train_path, val_path)
            task = asyncio.ensure_future(asyncio.to_thread(train, cfg, ctl.on_step))
            every = min(5.0, self.settings.finetune_lease_seconds / 4)  # events reach the API within 5 s
            while not task.done():
                await asyncio.wait({task}, timeout=every)
                await self._heartbeat(job, ctl)
            try:
                result = task.result()
            except Interrupted:
                await self._interrupted(job, ctl)
                return
            except (SystemExit, Exception) as e:  # the trainer's refusals are SystemExit with the reason
                log.exception("job %s: training failed", job.id)
                await self._finish(job, "failed", error=_error("training_failed", str(e) or type(e).__name__))
                return
            await self._succeed(job, ctl, result.adapter)

    async def _heartbeat(self, job: JobRecord, ctl: Control) -> None:
        if ctl.lost.is_set():
            return
        events = ctl.take()
        try:
            now = await self.store.heartbeat(job.id, self.id, events)
        except LeaseLost:
            log.warning("job %s: the lease was lost (the job was queued again or finished); stopping it", job.id)
            ctl.lost.set()
            return
        except StoreError as e:  # the lease outlives a short outage; the events are sent next time
            log.warning("job %s: heartbeat failed (%s)", job.id, e)
            ctl.put_back(events)
            return
        if now.cancel_requested:
            ctl.cancel.set()

    async def _interrupted(self, job: JobRecord, ctl: Control) -> None:
        if ctl.lost.is_set():
            return  # another worker owns the job now: write nothing
        if ctl.cancel.is_set():
            await self._finish(job, "cancelled", events=[NewJobEvent("The job was cancelled")])
            return
        await self.store.release_job(
            job.id, self.id, NewJobEvent("The training worker stopped; the job is queued again", level="warn")
        )
        log.info("job %s: handed back to the queue", job.id)

    async def _succeed(self, job: JobRecord, ctl: Control, adapter) -> None:
        from aligner_core.adapter_format import encode

        name = adapter_name(job.id, job.spec.get("suffix"))
        blob = encode(adapter)
        new = NewAdapter(
            name=name,
            blob=blob,
            tokens=adapter.tokens,
            params=adapter.params,
            sha256=adapter.sha256(),
            base_model=adapter.base_model,
        )
        seconds = time.perf_counter() - ctl.started
        events = [
            *ctl.take(final=True),
            NewJobEvent(f"New fine-tuned model created: {name} ({adapter.params} parameters, {len(blob)} bytes)"),
            NewJobEvent(f"The job has successfully completed in {seconds:.0f} s"),
        ]
        checkpoint = NewCheckpoint(step=int(ctl.last.get("step", job.spec["steps"])), metrics=dict(ctl.last))
        try:
            await self.store.finish_job(
                job.id,
                self.id,
                status="succeeded",
                events=events,
                adapter=new,
                checkpoint=checkpoint,
                trained_tokens=job.training_tokens,
            )
        except QuotaExceeded as e:
            await self._finish(job, "failed", error=_error("quota_exceeded", f"the adapter could not be stored: {e}"))
            return
        except LeaseLost:
            log.warning("job %s: finished after its lease was lost; the result is dropped", job.id)
            return
        log.info("job %s: succeeded in %.0f s: adapter %s", job.id, seconds, name)

    async def _finish(
        self, job: JobRecord, status: str, *, error: dict | None = None, events: list[NewJobEvent] | None = None
    ) -> None:
        ctl = self.control
        pending = ctl.take(final=True) if ctl else []
        if error is not None:
            pending.append(NewJobEvent(f"The job failed: {error['message']}", level="error"))
        try:
            await self.store.finish_job(job.id, self.id, status=status, events=pending + (events or []), error=error)
        except LeaseLost:
            return
        log.info("job %s: %s%s", job.id, status, f" ({error['message']})" if error else "")


class WorkerProcesses:
    """The workers `aligner serve` starts beside itself (ALIGNER_FINETUNE_WORKERS), each `python -m
    server.finetune_worker` with the server's settings; one that dies is started again after a pause."""

    RESTART_PAUSE_S = 5.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.procs: list[asyncio.subprocess.Process | None] = [None] * settings.finetune_workers
        self._watch: asyncio.Task | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # what `aligner serve` may have taken from its flags rather than the environment
        env.update(ALIGNER_STORE=self.settings.store, ALIGNER_MODEL=self.settings.model)
        env["ALIGNER_CACHE_DIR"] = str(self.settings.cache_dir)
        env["OMP_NUM_THREADS"] = str(self.settings.finetune_threads)
        return env

    async def _spawn(self, i: int) -> None:
        cmd = [sys.executable, "-m", "server.finetune_worker", "--id", f"{socket.gethostname()}-{os.getpid()}-w{i}"]
        proc = self.procs[i] = await asyncio.create_subprocess_exec(*cmd, env=self._env())
        log.info("started training worker %d (pid %d)", i, proc.pid)

    async def start(self) -> None:
        for i in range(len(self.procs)):
            await self._spawn(i)
        if self.procs:
            self._watch = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.returncode is not None:
                    log.error(
                        "training worker %d exited with %s; starting it again in %.0f s",
                        i,
                        proc.returncode,
                        self.RESTART_PAUSE_S,
                    )
                    await asyncio.sleep(self.RESTART_PAUSE_S)
                    await self._spawn(i)

    async def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (each hands its job back to the queue), then SIGKILL after `grace_s`."""
        if self._watch is not None:
            self._watch.cancel()
        alive = [p for p in self.procs if p is not None and p.returncode is None]
        for p in alive:
            p.terminate()
        for p in alive:
            try:
                await asyncio.wait_for(p.wait(), grace_s)
            except TimeoutError:
                log.warning("training worker pid %d did not stop in %.0f s; killing it", p.pid, grace_s)
                p.kill()
                await p.wait()


def _error(code: str, message: str) -> dict:
    return {"code": code, "message": message[:1000], "param": None}


async def serve(settings: Settings, worker_id: str | None = None) -> None:
    import torch

    torch.set_num_threads(settings.finetune_threads)
    store = open_store(settings.store)
    await store.open()
    worker = Worker(store, settings, worker_id)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="aligner fine-tune worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="the store URL (default: ALIGNER_STORE)")
    ap.add_argument("--id", help="this worker's name in the jobs it claims (default: host-pid)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(**({"store": args.store} if args.store else {}))
    asyncio.run(serve(settings, args.id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
