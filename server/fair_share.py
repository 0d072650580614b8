"""Fair share between tenants: what one tenant may have in flight at once, so it cannot starve the others.

Each generation request is admitted against its tenant's limits (`Quotas`: concurrent requests, sequences
per request, tokens in flight, distinct adapters in flight) before it reaches the engine, and holds a
`Ticket` until its last token is streamed. Past a limit it gets a 429 with `Retry-After`. Inside the
engine, vLLM's priority scheduler orders the admitted requests: each request's priority is its tenant's
load when it arrived (lower runs earlier), so a quiet tenant's request goes ahead of a busy tenant's queue.

Tickets also carry the API key that made them: `revoke` ends every request of a key the moment the key
is revoked here (the admin route), or within a poll when it is revoked through another replica
(`watch_revocations`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from adapters_store import Quotas, Tenant
from server.errors import RateLimited

log = logging.getLogger("aligner.server")


def default_quotas(settings) -> Quotas:
    """What a tenant the admin creates gets for every limit it leaves out (`ALIGNER_TENANT_*`)."""
    active = settings.tenant_max_active_adapters
    return Quotas(
        max_adapters=settings.tenant_max_adapters,
        max_adapter_bytes=settings.tenant_max_adapter_bytes,
        requests_per_minute=settings.tenant_requests_per_minute,
        max_concurrent_requests=settings.tenant_max_concurrent_requests,
        max_n=settings.tenant_max_n,
        max_tokens_in_flight=settings.tenant_max_tokens_in_flight,
        max_active_adapters=active if active is not None else max(1, settings.max_resident_adapters // 4),
        max_files=settings.tenant_max_files,
        max_file_bytes=settings.tenant_max_file_bytes,
        max_queued_jobs=settings.tenant_max_queued_jobs,
        max_training_tokens=settings.tenant_max_training_tokens,
    )


@dataclass(frozen=True)
class Demand:
    """What one request may occupy in the engine."""

    sequences: int  # n x prompts
    tokens: int  # upper bound of prompt + completion tokens over all its sequences
    adapters: tuple[str, ...] = ()  # the engine keys it holds (a stack's each; none: the base model)


@dataclass
class _Load:
    requests: int = 0
    sequences: int = 0
    tokens: int = 0
    adapters: Counter = field(default_factory=Counter)  # engine key -> requests using it


def _over(limit: str, message: str, *, retry_after: int = 1, param: str | None = None) -> RateLimited:
    """The 429 for passing `limit` (a `Quotas` field, kept on the error for the metrics)."""
    err = RateLimited(message, retry_after=retry_after, param=param)
    err.limit = limit
    return err


class Ticket:
    """One admitted request; `release()` exactly once (idempotent)."""

    def __init__(self, share: FairShare, tenant_id: str, demand: Demand, api_key: tuple[str, str] | None) -> None:
        self.share, self.tenant_id, self.demand = share, tenant_id, demand
        self.key_id: str | None
        self.key_hash: str | None
        self.key_id, self.key_hash = api_key or (None, None)
        self.task: asyncio.Task | None = asyncio.current_task()  # cancelled if the key is revoked
        self.revoked = False
        self._released = False

    def follow(self) -> None:
        """The request goes on in the current task (a streaming response's)."""
        self.task = asyncio.current_task()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.share._release(self)


class FairShare:
    def __init__(self) -> None:
        self._load: dict[str, _Load] = {}
        self._tickets: set[Ticket] = set()

    def admit(self, tenant: Tenant, demand: Demand, *, api_key: tuple[str, str] | None = None) -> Ticket:
        """A ticket for the request, or RateLimited naming the limit it passes."""
        q = tenant.quotas
        load = self._load.get(tenant.id) or _Load()
        if q.max_n is not None and demand.sequences > q.max_n:
            raise _over(
                "max_n",
                f"This request asks for {demand.sequences} sequences (n x prompts); the limit per "
                f"request is {q.max_n}.",
                retry_after=60,
                param="n",
            )
        if q.max_tokens_in_flight is not None and demand.tokens > q.max_tokens_in_flight:
            raise _over(
                "max_tokens_in_flight",
                f"This request may hold up to {demand.tokens} tokens (n x (prompt + "
                f"max_tokens)); your limit of tokens in flight is {q.max_tokens_in_flight}: lower max_tokens "
                "or n.",
                retry_after=60,
                param="max_tokens",
            )
        if q.max_concurrent_requests is not None and load.requests >= q.max_concurrent_requests:
            raise _over(
                "max_concurrent_requests",
                f"Limit of {q.max_concurrent_requests} concurrent requests reached; retry when one finishes.",
            )
        if q.max_tokens_in_flight is not None and load.tokens + demand.tokens > q.max_tokens_in_flight:
            raise _over(
                "max_tokens_in_flight",
                f"Limit of {q.max_tokens_in_flight} tokens in flight reached "
                f"({load.tokens} held, this request needs up to {demand.tokens}); retry when a request "
                "finishes.",
            )
        new_adapters = set(demand.adapters) - set(load.adapters)
        if (
            new_adapters
            and q.max_active_adapters is not None
            and len(load.adapters) + len(new_adapters) > q.max_active_adapters
        ):
            raise _over(
                "max_active_adapters",
                f"Limit of {q.max_active_adapters} distinct adapters in flight at "
                "once reached; retry when a request finishes.",
                param="adapter",
            )
        self._load[tenant.id] = load
        load.requests += 1
        load.sequences += demand.sequences
        load.tokens += demand.tokens
        for key in demand.adapters:
            load.adapters[key] += 1
        ticket = Ticket(self, tenant.id, demand, api_key)
        self._tickets.add(ticket)
        return ticket

    def priority(self, tenant_id: str) -> int:
        """The tenant's sequences in flight: vLLM runs lower values first."""
        load = self._load.get(tenant_id)
        return load.sequences if load else 0

    def in_flight(self, tenant_id: str) -> tuple[int, int, int]:
        """(requests, sequences, tokens) the tenant holds."""
        load = self._load.get(tenant_id) or _Load()
        return load.requests, load.sequences, load.tokens

    def _release(self, ticket: Ticket) -> None:
        self._tickets.discard(ticket)
        load = self._load[ticket.tenant_id]
        load.requests -= 1
        load.sequences -= ticket.demand.sequences
        load.tokens -= ticket.demand.tokens
        for key in ticket.demand.adapters:
            load.adapters[key] -= 1
            if load.adapters[key] == 0:
                del load.adapters[key]
        if load.requests == 0:
            del self._load[ticket.tenant_id]

    # ---- revocation ----
    def key_hashes(self) -> set[str]:
        return {t.key_hash for t in self._tickets if t.key_hash is not None}

    def revoke(self, key_hash: str | None = None, *, key_id: str | None = None) -> int:
        """End every in-flight request made with this key (by hash or id); returns how many."""
        wanted = {k for k in (key_hash, key_id) if k is not None}
        hit = [t for t in self._tickets if not t.revoked and wanted & {t.key_hash, t.key_id}]
        for t in hit:
            t.revoked = True
            if t.task is not None:
                t.task.cancel()
        return len(hit)


async def watch_revocations(
    share: FairShare, still_valid: Callable[[str], Awaitable[bool]], interval_s: float = 0.25
) -> None:
    """Every `interval_s`, check each key with requests in flight; end the requests of a revoked one.
    Polling the store covers a revocation through any replica."""
    while True:
        await asyncio.sleep(interval_s)
        for key_hash in share.key_hashes():
            try:
                valid = await still_valid(key_hash)
            except Exception:  # the store is unavailable: check again next round
                log.warning("could not check an API key for revocation", exc_info=True)
                continue
            if not valid:
                ended = share.revoke(key_hash)
                log.info("an API key was revoked: ended %d request(s) in flight", ended)
