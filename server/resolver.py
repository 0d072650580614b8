"""Name -> adapter record, cached, and kept true by the store's change feed (LISTEN/NOTIFY on PostgreSQL).

A replica learns of an upload, overwrite or delete made through another replica from the feed, not by
polling. Entries are grouped by adapter name: any change to a name (a tenant's or a public one) drops every
tenant's entries for it, and a `resync` (the feed reconnected, events may be lost) drops everything.
A lookup that raced with an invalidation is not cached (a per-name generation counter guards it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from adapters_store import AdapterRecord, ChangeEvent, NotFound, Store

_MISSING = None  # cached "not visible to this tenant"


class AdapterResolver:
    def __init__(
        self, store: Store, *, max_entries: int = 200_000, on_deleted: Callable[[str], Awaitable[None]] | None = None
    ) -> None:
        self.store = store
        self.max_entries = max_entries
        self.on_deleted = on_deleted  # called with the engine key (sha256) of each deleted record we knew
        self._by_name: dict[str, dict[tuple[str, int | None], AdapterRecord | None]] = {}
        self._generation: dict[str, int] = {}
        self._size = 0

    async def resolve(self, tenant_id: str, name: str, version: int | None = None) -> AdapterRecord:
        entries = self._by_name.get(name)
        if entries is not None and (tenant_id, version) in entries:
            record = entries[(tenant_id, version)]
            if record is _MISSING:
                raise NotFound(f"adapter '{name}' not found")
            return record
        generation = self._generation.get(name, 0)
        try:
            record = await self.store.get_adapter(tenant_id, name, version)
        except NotFound:
            self._remember(name, generation, (tenant_id, version), _MISSING)
            raise
        self._remember(name, generation, (tenant_id, version), record)
        return record

    def _remember(self, name: str, generation: int, key: tuple[str, int | None], value: AdapterRecord | None) -> None:
        if self._generation.get(name, 0) != generation:
            return  # the name changed while we were reading: the result may already be stale
        if self._size >= self.max_entries:
            self._by_name.clear()
            self._size = 0
        entries = self._by_name.setdefault(name, {})
        if key not in entries:
            self._size += 1
        entries[key] = value

    async def on_change(self, event: ChangeEvent) -> None:
        if event.kind == "resync":
            for name in list(self._by_name):
                self._generation[name] = self._generation.get(name, 0) + 1
            self._by_name.clear()
            self._size = 0
            return
        self._generation[event.name] = self._generation.get(event.name, 0) + 1
        dropped = list(self._by_name.pop(event.name, {}).values())
        self._size -= len(dropped)
        if event.kind == "adapter_deleted" and self.on_deleted is not None:
            gone = {
                r.sha256
                for r in dropped
                if r is not None and r.tenant_id == event.tenant_id and event.version in (None, r.version)
            }
            for key in gone:
                await self.on_deleted(key)
