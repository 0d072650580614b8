"""Plain records exchanged with the store.

They are frozen dataclasses so that a record handed to one request cannot be
mutated under another, and they carry no backend types (no sqlite rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

#: Name of the reserved tenant whose adapters every tenant sees (see
#: ``Store.ensure_public_tenant``). ``list_tenants`` leaves it out, and
#: ``ensure_tenant``/``create_tenant`` refuse the name.
PUBLIC_TENANT_NAME = "__public__"


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits; ``None`` means unlimited, 0 forbids any use.

    ``max_adapters`` counts owned adapter versions and ``max_adapter_bytes``
    their total blob size; the store enforces both in ``create_adapter``.

    The rest are only stored: the server enforces them on generation requests.

    * ``requests_per_minute``: requests admitted per minute (rate limiting).
    * ``max_concurrent_requests``: requests the tenant may have in flight at once.
    * ``max_n``: the largest ``n`` (and ``best_of``) of one request.
    * ``max_tokens_in_flight``: the sum over the tenant's in-flight requests of
      ``n * (prompt tokens + max_tokens)``.
    * ``max_active_adapters``: distinct adapters the tenant's in-flight requests
      may use at once (its share of the engine's hot adapter slots).

    Each field is a column of the same name in the backends' ``tenants`` table.
    """

    max_adapters: int | None = None
    max_adapter_bytes: int | None = None
    requests_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    max_n: int | None = None
    max_tokens_in_flight: int | None = None
    max_active_adapters: int | None = None


@dataclass(frozen=True)
class Tenant:
    """A customer namespace; adapters belong to exactly one tenant."""

    id: str
    name: str
    created_at: datetime
    quotas: Quotas = field(default_factory=Quotas)


@dataclass(frozen=True)
class ApiKey:
    """One API key of a tenant. Only its hash is stored; ``prefix`` is for display."""

    id: str
    tenant_id: str
    prefix: str
    created_at: datetime
    revoked: bool


@dataclass(frozen=True)
class AdapterRecord:
    """Metadata of one stored adapter version.

    The blob is deliberately absent: listings must stay cheap, and the weights
    are fetched separately with ``Store.get_blob`` only when a model is loaded.
    """

    id: str
    tenant_id: str
    name: str
    version: int
    tokens: int
    params: int
    bytes: int
    sha256: str
    base_model: str
    public: bool
    created_at: datetime


@dataclass(frozen=True)
class NewAdapter:
    """What the server hands in to create a version; the store assigns id and version."""

    name: str
    blob: bytes
    tokens: int
    params: int
    sha256: str
    base_model: str

    @property
    def bytes(self) -> int:
        """Size of the blob, recorded for quotas."""
        return len(self.blob)


@dataclass(frozen=True)
class Page:
    """One page of a cursor-paginated listing.

    ``next_after`` is the value to pass as ``after`` for the next page, or
    None when this page is the last one.
    """

    items: list[AdapterRecord]
    next_after: str | None


ChangeKind = Literal["adapter_created", "adapter_deleted", "adapter_public", "resync"]
CHANGE_KINDS: tuple[str, ...] = ("adapter_created", "adapter_deleted", "adapter_public", "resync")


@dataclass(frozen=True)
class ChangeEvent:
    """A committed write, as seen by ``Store.subscribe`` callbacks (possibly on another replica).

    * ``adapter_created``: ``version`` is the new version.
    * ``adapter_deleted``: ``version`` is the deleted version, or None when
      every version of the name was deleted at once.
    * ``adapter_public``: the name was published or unpublished (re-read it);
      ``version`` is None.
    * ``resync``: the feed may have missed events (its connection dropped and
      was re-established); ``tenant_id`` and ``name`` are empty and a
      subscriber should drop or reload everything it cached. Subscribers
      should ignore kinds they do not know.

    Events carry no data beyond the key: a subscriber re-reads the store.
    """

    kind: ChangeKind
    tenant_id: str
    name: str
    version: int | None = None
