"""The backend-neutral store interface.

The server depends only on this class, so that the SQLite backend used in
development and the PostgreSQL backend are interchangeable. SQL of any
dialect belongs in ``sql.py`` and the driver modules, never here; both drivers
implement this interface through ``sql_store.SQLStore``.

Visibility rules shared by every backend:

* A tenant sees the adapters it owns and every public adapter.
* When the tenant owns an adapter of some name, that name resolves to its own
  versions only: a public adapter of the same name is shadowed.
* Otherwise the name resolves to the public adapter of that name whose owner
  published first (earliest created version, then owner id), so that the
  answer does not change when another tenant later publishes the same name.
* Absent and invisible adapters raise the same ``NotFound`` message.
* The reserved tenant ``__public__`` (``ensure_public_tenant``) is a shared
  namespace: every adapter it owns is created public. ``list_tenants`` leaves
  it out and ``ensure_tenant``/``create_tenant`` refuse its name.

Quotas: ``create_adapter`` checks the owner's ``max_adapters`` (owned
versions, the new one included) and ``max_adapter_bytes`` (total blob bytes,
the new blob included) under the same lock/transaction as the insert, so
concurrent creates can never overshoot a limit; a refused create raises
``QuotaExceeded`` and writes nothing. The other quotas (request rate and the
limits on in-flight generation) are only stored: the server enforces them.

API keys are stored only as hashes chosen by the caller; the store never sees
a plain key. ``find_api_key`` is an indexed lookup by hash.

Change feed: ``subscribe`` delivers a ``ChangeEvent`` for every committed
adapter write (create, delete, publish/unpublish), after the commit, to keep
caches of several replicas in step. Delivery is best effort and at most once
per connection; a ``resync`` event says events may have been missed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from datetime import datetime
from types import TracebackType

from .models import (
    AdapterRecord,
    ApiKey,
    ChangeEvent,
    CheckpointRecord,
    FileRecord,
    JobEvent,
    JobRecord,
    ListPage,
    NewAdapter,
    NewCheckpoint,
    NewFile,
    NewJob,
    NewJobEvent,
    Page,
    Quotas,
    Tenant,
)

ChangeCallback = Callable[[ChangeEvent], Awaitable[None] | None]


class Store(ABC):
    """Async adapter and tenant store.

    Construct, then ``await open()`` (or use ``async with``); ``open`` creates
    or migrates the schema so the server never runs against a stale one.
    """

    @abstractmethod
    async def open(self) -> None:
        """Connect and apply any missing schema migrations."""

    @abstractmethod
    async def close(self) -> None:
        """Release the connection; the store may be opened again afterwards."""

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # Tenants

    @abstractmethod
    async def ensure_tenant(self, name: str) -> Tenant:
        """Return the tenant called ``name``, creating it if needed (idempotent)."""

    @abstractmethod
    async def create_tenant(self, name: str, quotas: Quotas | None = None) -> Tenant:
        """Create the tenant ``name`` (default quotas: unlimited); ``Conflict`` if it exists."""

    @abstractmethod
    async def set_quotas(self, tenant_id: str, quotas: Quotas) -> Tenant:
        """Replace the tenant's quotas and return it; ``NotFound`` if absent.

        Lowering a limit below current usage is allowed: it only refuses
        later creates.
        """

    @abstractmethod
    async def ensure_public_tenant(self) -> Tenant:
        """Return the reserved ``__public__`` tenant, creating it if needed (idempotent)."""

    @abstractmethod
    async def get_tenant(self, tenant_id: str) -> Tenant:
        """Return the tenant; ``NotFound`` if absent."""

    @abstractmethod
    async def list_tenants(self) -> list[Tenant]:
        """Return every tenant but ``__public__``, ordered by name."""

    # API keys

    @abstractmethod
    async def create_api_key(self, tenant_id: str, *, key_hash: str, prefix: str) -> ApiKey:
        """Record a key of ``tenant_id`` by its hash.

        ``NotFound`` for an unknown tenant, ``Conflict`` if the hash is
        already stored (revoked keys included: a hash is never reused).
        """

    @abstractmethod
    async def find_api_key(self, key_hash: str) -> tuple[ApiKey, Tenant]:
        """Return the non-revoked key with this hash and its tenant; ``NotFound`` otherwise."""

    @abstractmethod
    async def list_api_keys(self, tenant_id: str) -> list[ApiKey]:
        """Every key of the tenant, revoked ones included, oldest first; ``NotFound`` if absent."""

    @abstractmethod
    async def revoke_api_key(self, key_id: str) -> ApiKey:
        """Revoke a key (idempotent) and return it; ``NotFound`` if absent."""

    # Adapters

    @abstractmethod
    async def create_adapter(self, tenant_id: str, new: NewAdapter) -> AdapterRecord:
        """Store a new version of ``new.name`` owned by ``tenant_id``.

        The version is 1 for a new name, else the highest existing version
        plus one; concurrent creates of one name get distinct versions. Row
        and blob are written atomically. A new version inherits the public
        flag of the name's existing versions, since ``set_public`` treats
        publicity as a property of the name; adapters of the ``__public__``
        tenant are always created public. ``QuotaExceeded`` if the tenant's
        ``max_adapters`` or ``max_adapter_bytes`` would be exceeded.
        """

    @abstractmethod
    async def get_adapter(self, tenant_id: str, name: str, version: int | None = None) -> AdapterRecord:
        """Resolve a visible adapter; ``version=None`` means the newest."""

    @abstractmethod
    async def get_blob(self, adapter_id: str) -> bytes:
        """Return the stored weights of one adapter version; ``NotFound`` if absent."""

    @abstractmethod
    async def list_adapters(self, tenant_id: str, *, limit: int = 100, after: str | None = None) -> Page:
        """Newest version of each visible name, ordered by name, after cursor ``after``."""

    @abstractmethod
    async def list_versions(self, tenant_id: str, name: str) -> list[AdapterRecord]:
        """All versions of the visible name, ascending; ``NotFound`` if none."""

    @abstractmethod
    async def delete_adapter(self, tenant_id: str, name: str, version: int | None = None) -> list[AdapterRecord]:
        """Delete owned versions (all, or one); return them; ``NotFound`` if none matched.

        Only adapters owned by ``tenant_id`` are ever deleted, so a public
        adapter cannot be removed by a tenant that merely sees it.
        """

    @abstractmethod
    async def set_public(self, adapter_tenant_id: str, name: str, public: bool) -> None:
        """Publish or unpublish every version of an owned name; ``NotFound`` if none."""

    @abstractmethod
    async def count_usage(self, tenant_id: str) -> tuple[int, int]:
        """Return (owned adapter versions, total blob bytes) for quota checks."""

    # Fine-tuning files. A tenant sees only its own files: another tenant's id is ``NotFound``,
    # with the same message as an absent one.

    @abstractmethod
    async def create_file(self, tenant_id: str, new: NewFile) -> FileRecord:
        """Store a validated file; ``QuotaExceeded`` (``max_files``, ``max_file_bytes``) writes nothing."""

    @abstractmethod
    async def get_file(self, tenant_id: str, file_id: str) -> FileRecord:
        """The tenant's file; ``NotFound`` if absent or another tenant's."""

    @abstractmethod
    async def get_file_content(self, tenant_id: str, file_id: str) -> bytes:
        """The file's bytes; ``NotFound`` as ``get_file``."""

    @abstractmethod
    async def list_files(
        self, tenant_id: str, *, limit: int = 100, after: str | None = None, purpose: str | None = None
    ) -> ListPage[FileRecord]:
        """The tenant's files, newest first, after the file id ``after``."""

    @abstractmethod
    async def delete_file(self, tenant_id: str, file_id: str) -> FileRecord:
        """Delete the tenant's file; ``Conflict`` while a queued or running job uses it."""

    # Fine-tuning jobs: a queue shared by every worker on the database.

    @abstractmethod
    async def create_job(self, tenant_id: str, new: NewJob, events: list[NewJobEvent]) -> JobRecord:
        """Queue a job (status ``queued``) with its first events.

        ``NotFound`` if a file it names is not the tenant's; ``QuotaExceeded`` for
        ``max_queued_jobs`` (queued and running jobs, the new one included) or
        ``max_training_tokens``, checked under the tenant's lock as ``create_adapter``.
        """

    @abstractmethod
    async def get_job(self, tenant_id: str, job_id: str) -> JobRecord:
        """The tenant's job; ``NotFound`` if absent or another tenant's."""

    @abstractmethod
    async def list_jobs(self, tenant_id: str, *, limit: int = 20, after: str | None = None) -> ListPage[JobRecord]:
        """The tenant's jobs, newest first, after the job id ``after``."""

    @abstractmethod
    async def list_job_events(
        self, tenant_id: str, job_id: str, *, limit: int = 20, after: str | None = None
    ) -> ListPage[JobEvent]:
        """The job's events, newest first, after the event id ``after``; ``NotFound`` as ``get_job``."""

    @abstractmethod
    async def list_checkpoints(
        self, tenant_id: str, job_id: str, *, limit: int = 10, after: str | None = None
    ) -> ListPage[CheckpointRecord]:
        """The job's checkpoints, newest first; ``NotFound`` as ``get_job``."""

    @abstractmethod
    async def cancel_job(self, tenant_id: str, job_id: str) -> JobRecord:
        """Cancel a job: a queued one at once (``cancelled``), a running one by setting
        ``cancel_requested`` (its worker stops at its next heartbeat). ``Conflict`` if finished."""

    @abstractmethod
    async def claim_job(self, worker_id: str, *, lease_s: float, max_attempts: int) -> JobRecord | None:
        """Take the oldest queued job for ``worker_id`` (``running``, attempts + 1), or None.

        First every running job whose heartbeat is older than ``lease_s`` is queued again with an
        event, or failed (code ``worker_lost``) once it has had ``max_attempts`` claims. Two
        workers never get the same job (PostgreSQL: ``FOR UPDATE SKIP LOCKED``).
        """

    @abstractmethod
    async def heartbeat(
        self, job_id: str, worker_id: str, events: list[NewJobEvent], *, trained_tokens: int | None = None
    ) -> JobRecord:
        """Renew the worker's lease and append its events; returns the job (its ``cancel_requested``).

        ``LeaseLost`` if the job is no longer running under ``worker_id`` (requeued after a lost
        lease, or finished): the worker must stop and write nothing more.
        """

    @abstractmethod
    async def finish_job(
        self,
        job_id: str,
        worker_id: str,
        *,
        status: str,
        events: list[NewJobEvent],
        adapter: NewAdapter | None = None,
        checkpoint: NewCheckpoint | None = None,
        error: dict | None = None,
        trained_tokens: int | None = None,
    ) -> JobRecord:
        """End a running job of ``worker_id`` in one transaction: ``succeeded`` stores ``adapter``
        for the job's tenant (``create_adapter``, quotas included) and names it in
        ``fine_tuned_model``, with ``checkpoint``; ``failed`` records ``error``; ``cancelled``.
        ``LeaseLost`` as ``heartbeat``; ``QuotaExceeded`` from the adapter writes nothing.
        """

    @abstractmethod
    async def release_job(self, job_id: str, worker_id: str, event: NewJobEvent) -> None:
        """A stopping worker hands its running job back: ``queued`` again, its claim not counted
        against ``max_attempts``. Nothing happens if the job is no longer the worker's."""

    @abstractmethod
    async def job_counts(self) -> dict[str, int]:
        """Jobs per status over every tenant (for the metrics)."""

    @abstractmethod
    async def training_steps_since(self, since: datetime) -> int:
        """Training steps reported (``metrics`` events) by every worker since ``since`` (for the metrics)."""

    # Change feed (optional: a backend without one raises NotImplementedError)

    async def subscribe(self, callback: ChangeCallback) -> None:
        """Call ``callback(event)`` for each committed adapter change from now on.

        The store must be open. Once this returns, every later commit is
        delivered, from this store and (for a shared database such as
        PostgreSQL) from every other store on the same database. Callbacks may
        be plain functions or coroutine functions; they run one event at a
        time, in commit order per source, on the event loop that subscribed,
        and never inside the writer's call. Exceptions they raise are logged
        and swallowed. ``close()`` unsubscribes everyone.
        """
        raise NotImplementedError(f"{type(self).__name__} has no change feed")

    async def unsubscribe(self, callback: ChangeCallback) -> None:
        """Stop calling ``callback``; a callback that was not subscribed is ignored."""
        raise NotImplementedError(f"{type(self).__name__} has no change feed")
