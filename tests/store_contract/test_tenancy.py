"""Contract for tenants with quotas, hashed API keys and the public namespace.

Runs against every backend through the ``backend`` fixture (conftest.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import FrozenInstanceError

import pytest

from adapters_store import (
    PUBLIC_TENANT_NAME,
    ApiKey,
    Conflict,
    NotFound,
    QuotaExceeded,
    Quotas,
    Store,
    StoreError,
)

from .conftest import Backend
from .support import EVERY_QUOTA, OTHER_QUOTAS, new_adapter

# Tenants and quotas


def test_create_tenant_conflicts_on_existing_name(backend: Backend) -> None:
    async def body(store: Store):
        created = await store.create_tenant("acme")
        with pytest.raises(Conflict, match="tenant 'acme' already exists"):
            await store.create_tenant("acme", Quotas(max_adapters=1))
        # ensure_tenant stays idempotent and returns the same tenant
        ensured = await store.ensure_tenant("acme")
        ensured_new = await store.ensure_tenant("globex")
        with pytest.raises(Conflict):
            await store.create_tenant("globex")
        return created, ensured, ensured_new, await store.list_tenants()

    created, ensured, ensured_new, tenants = backend.run(body)
    assert created == ensured
    assert created.id.startswith("ten_")
    assert created.quotas == Quotas()  # the refused create changed nothing
    assert [t.name for t in tenants] == ["acme", "globex"]
    assert ensured_new.quotas == Quotas()


def test_quotas_default_to_unlimited_and_round_trip(backend: Backend) -> None:
    quotas = Quotas(max_adapters=3, max_adapter_bytes=5_000_000_000, requests_per_minute=60)

    async def body(store: Store):
        plain = await store.create_tenant("plain")
        ensured = await store.ensure_tenant("ensured")
        limited = await store.create_tenant("limited", quotas)
        fetched = await store.get_tenant(limited.id)
        changed = await store.set_quotas(plain.id, Quotas(requests_per_minute=10))
        after_change = await store.get_tenant(plain.id)
        cleared = await store.set_quotas(limited.id, Quotas())
        listed = {t.name: t.quotas for t in await store.list_tenants()}
        return plain, ensured, limited, fetched, changed, after_change, cleared, listed

    plain, ensured, limited, fetched, changed, after_change, cleared, listed = backend.run(body)
    assert plain.quotas == ensured.quotas == Quotas(None, None, None)
    assert limited.quotas == quotas and fetched == limited
    assert changed.quotas == after_change.quotas == Quotas(requests_per_minute=10)
    assert changed.id == plain.id and changed.created_at == plain.created_at
    assert cleared.quotas == Quotas()
    assert listed == {
        "ensured": Quotas(),
        "limited": Quotas(),
        "plain": Quotas(requests_per_minute=10),
    }
    with pytest.raises(FrozenInstanceError):
        quotas.max_adapters = 9  # type: ignore[misc]


def test_every_quota_round_trips_through_each_read(backend: Backend) -> None:
    async def body(store: Store):
        created = await store.create_tenant("acme", EVERY_QUOTA)
        await store.create_api_key(created.id, key_hash="h", prefix="sk-h")
        reads = [await store.get_tenant(created.id), (await store.find_api_key("h"))[1]]
        reads += await store.list_tenants()
        replaced = await store.set_quotas(created.id, OTHER_QUOTAS)
        reads_after = [await store.get_tenant(created.id), (await store.find_api_key("h"))[1]]
        reads_after += await store.list_tenants()
        # set_quotas replaces all seven: a field left out goes back to unlimited.
        narrowed = await store.set_quotas(created.id, Quotas(max_n=1, max_active_adapters=0))
        return created, reads, replaced, reads_after, narrowed, await store.get_tenant(created.id)

    created, reads, replaced, reads_after, narrowed, narrowed_read = backend.run(body)
    assert created.quotas == EVERY_QUOTA
    assert reads == [created] * 3
    assert replaced.quotas == OTHER_QUOTAS
    assert (replaced.id, replaced.name, replaced.created_at) == (created.id, "acme", created.created_at)
    assert reads_after == [replaced] * 3
    assert narrowed.quotas == narrowed_read.quotas == Quotas(max_n=1, max_active_adapters=0)


def test_set_quotas_unknown_tenant_raises_not_found(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.set_quotas("ten_missing", Quotas(max_adapters=1))

    with pytest.raises(NotFound, match="ten_missing"):
        backend.run(body)


_TOO_LARGE = 2**63  # one past what a signed 64-bit column holds


@pytest.mark.parametrize(
    "quotas",
    [
        Quotas(max_adapters=-1),
        Quotas(max_adapter_bytes=-5),
        Quotas(requests_per_minute=1.5),  # type: ignore[arg-type]
        Quotas(max_concurrent_requests=-1),
        Quotas(max_concurrent_requests=_TOO_LARGE),
        Quotas(max_n=-1),
        Quotas(max_n=_TOO_LARGE),
        Quotas(max_n=True),
        Quotas(max_tokens_in_flight=-1),
        Quotas(max_tokens_in_flight=_TOO_LARGE),
        Quotas(max_active_adapters=-1),
        Quotas(max_active_adapters=_TOO_LARGE),
        Quotas(max_active_adapters="2"),  # type: ignore[arg-type]
    ],
)
def test_invalid_quotas_are_rejected(backend: Backend, quotas: Quotas) -> None:
    async def body(store: Store):
        tenant = await store.create_tenant("acme")
        with pytest.raises(ValueError, match="quota"):
            await store.set_quotas(tenant.id, quotas)
        with pytest.raises(ValueError, match="quota"):
            await store.create_tenant("other", quotas)
        return await store.get_tenant(tenant.id), await store.list_tenants()

    tenant, tenants = backend.run(body)
    assert tenant.quotas == Quotas()
    assert [t.name for t in tenants] == ["acme"]


# API keys


def test_api_key_create_find_list_revoke(backend: Backend) -> None:
    async def body(store: Store) -> None:
        acme = await store.create_tenant("acme", Quotas(requests_per_minute=5))
        other = await store.create_tenant("other")
        k1 = await store.create_api_key(acme.id, key_hash="hash-1", prefix="sk-aaaa")
        k2 = await store.create_api_key(acme.id, key_hash="hash-2", prefix="sk-bbbb")
        k3 = await store.create_api_key(other.id, key_hash="hash-3", prefix="sk-cccc")
        found_key, found_tenant = await store.find_api_key("hash-2")
        listed = await store.list_api_keys(acme.id)
        listed_other = await store.list_api_keys(other.id)
        revoked = await store.revoke_api_key(k1.id)
        revoked_again = await store.revoke_api_key(k1.id)
        with pytest.raises(NotFound, match="^api key not found$"):
            await store.find_api_key("hash-1")
        still_found = await store.find_api_key("hash-2")
        listed_after = await store.list_api_keys(acme.id)
        assert isinstance(k1, ApiKey)
        assert k1.id.startswith("key_") and len({k1.id, k2.id, k3.id}) == 3
        assert (k1.tenant_id, k1.prefix, k1.revoked) == (acme.id, "sk-aaaa", False)
        assert k1.created_at.utcoffset() is not None and k1.created_at.utcoffset().total_seconds() == 0
        assert found_key == k2
        assert found_tenant == acme and found_tenant.quotas == Quotas(requests_per_minute=5)
        assert listed == [k1, k2]
        assert listed_other == [k3]
        assert revoked.revoked is True and revoked.id == k1.id and revoked.created_at == k1.created_at
        assert revoked_again == revoked
        assert still_found == (k2, acme)
        assert [(k.id, k.revoked) for k in listed_after] == [(k1.id, True), (k2.id, False)]
        assert not any("hash" in repr(k) for k in listed_after)  # the hash never comes back

    backend.run(body)


def test_find_api_key_unknown_hash_raises_not_found(backend: Backend) -> None:
    async def body(store: Store) -> None:
        tenant = await store.create_tenant("acme")
        await store.create_api_key(tenant.id, key_hash="known", prefix="sk-kn")
        with pytest.raises(NotFound, match="^api key not found$"):
            await store.find_api_key("unknown")

    backend.run(body)


def test_revoked_key_is_not_found(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.create_tenant("acme")
        key = await store.create_api_key(tenant.id, key_hash="h", prefix="sk-h")
        before = await store.find_api_key("h")
        await store.revoke_api_key(key.id)
        with pytest.raises(NotFound):
            await store.find_api_key("h")
        # A revoked hash is never reused: the row (and its uniqueness) stays.
        with pytest.raises(Conflict):
            await store.create_api_key(tenant.id, key_hash="h", prefix="sk-h")
        return before

    before = backend.run(body)
    assert before[0].revoked is False


def test_api_key_errors(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.create_tenant("acme")
        other = await store.create_tenant("other")
        await store.create_api_key(tenant.id, key_hash="dup", prefix="sk-d")
        with pytest.raises(Conflict) as dup:
            await store.create_api_key(other.id, key_hash="dup", prefix="sk-d")
        with pytest.raises(NotFound, match="ten_missing"):
            await store.create_api_key("ten_missing", key_hash="new", prefix="sk-n")
        with pytest.raises(NotFound, match="key_missing"):
            await store.revoke_api_key("key_missing")
        with pytest.raises(NotFound, match="ten_missing"):
            await store.list_api_keys("ten_missing")
        with pytest.raises(ValueError):
            await store.create_api_key(tenant.id, key_hash="", prefix="sk-")
        return str(dup.value), await store.list_api_keys(other.id)

    message, other_keys = backend.run(body)
    assert "dup" not in message  # the hash is not echoed
    assert other_keys == []


# Quotas enforced by create_adapter


def test_max_adapters_counts_versions(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.create_tenant("acme", Quotas(max_adapters=2))
        free = await store.create_tenant("free")
        await store.create_adapter(tenant.id, new_adapter("tone", b"v1"))
        await store.create_adapter(tenant.id, new_adapter("tone", b"v2"))
        with pytest.raises(QuotaExceeded) as caught:
            await store.create_adapter(tenant.id, new_adapter("other", b"x"))
        for i in range(3):  # another tenant is unaffected
            await store.create_adapter(free.id, new_adapter(f"f{i}"))
        usage = await store.count_usage(tenant.id)
        await store.delete_adapter(tenant.id, "tone", 1)
        after_delete = await store.create_adapter(tenant.id, new_adapter("other", b"x"))
        return caught.value, usage, after_delete

    error, usage, after_delete = backend.run(body)
    assert isinstance(error, StoreError)
    assert (error.limit_name, error.limit, error.current) == ("max_adapters", 2, 2)
    assert str(error) == ("quota max_adapters exceeded: the tenant has 2 adapter versions and the limit is 2")
    assert usage == (2, 4)  # the refused create wrote nothing
    assert (after_delete.name, after_delete.version) == ("other", 1)


def test_max_adapter_bytes_includes_the_new_blob(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.create_tenant("acme", Quotas(max_adapter_bytes=10))
        await store.create_adapter(tenant.id, new_adapter("a", b"123456"))
        exact = await store.create_adapter(tenant.id, new_adapter("b", b"1234"))  # 10 == limit
        with pytest.raises(QuotaExceeded) as caught:
            await store.create_adapter(tenant.id, new_adapter("c", b"1"))
        with pytest.raises(NotFound):
            await store.get_adapter(tenant.id, "c")
        await store.set_quotas(tenant.id, Quotas(max_adapter_bytes=11))
        now_fits = await store.create_adapter(tenant.id, new_adapter("c", b"1"))
        return exact, caught.value, now_fits, await store.count_usage(tenant.id)

    exact, error, now_fits, usage = backend.run(body)
    assert exact.bytes == 4
    assert (error.limit_name, error.limit, error.current) == ("max_adapter_bytes", 10, 10)
    assert str(error) == (
        "quota max_adapter_bytes exceeded: the tenant stores 10 bytes, 1 more would pass the limit of 10"
    )
    assert now_fits.name == "c"
    assert usage == (3, 11)


def test_zero_quota_forbids_any_adapter(backend: Backend) -> None:
    async def body(store: Store) -> None:
        tenant = await store.create_tenant("acme", Quotas(max_adapters=0))
        await store.create_adapter(tenant.id, new_adapter("x"))

    with pytest.raises(QuotaExceeded, match="limit is 0"):
        backend.run(body)


def test_concurrent_creates_respect_max_adapters(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.create_tenant("acme", Quotas(max_adapters=5))
        results = await asyncio.gather(
            *(store.create_adapter(tenant.id, new_adapter(f"n{i:02d}", bytes([i]))) for i in range(20)),
            return_exceptions=True,
        )
        return results, await store.count_usage(tenant.id)

    results, usage = backend.run(body)
    failures = [r for r in results if isinstance(r, BaseException)]
    successes = [r for r in results if not isinstance(r, BaseException)]
    assert len(successes) == 5, failures
    assert len(failures) == 15
    assert all(isinstance(f, QuotaExceeded) and f.current == 5 for f in failures), failures
    assert usage == (5, 5)


# The public namespace


def test_public_tenant_adapters_are_public_and_visible_to_all(backend: Backend) -> None:
    async def body(store: Store):
        public = await store.ensure_public_tenant()
        again = await store.ensure_public_tenant()
        acme = await store.create_tenant("acme")
        globex = await store.ensure_tenant("globex")
        shared = await store.create_adapter(public.id, new_adapter("shared"))
        shared_v2 = await store.create_adapter(public.id, new_adapter("shared", b"v2"))
        private = await store.create_adapter(acme.id, new_adapter("private"))
        seen = {}
        for tenant in (acme, globex):
            seen[tenant.name] = (
                await store.get_adapter(tenant.id, "shared"),
                [a.name for a in (await store.list_adapters(tenant.id)).items],
            )
            with pytest.raises(NotFound):
                await store.delete_adapter(tenant.id, "shared")
        return public, again, shared, shared_v2, private, seen, await store.list_tenants()

    public, again, shared, shared_v2, private, seen, tenants = backend.run(body)
    assert public == again and public.name == PUBLIC_TENANT_NAME == "__public__"
    assert shared.public is True and shared_v2.public is True and private.public is False
    assert seen["acme"] == (shared_v2, ["private", "shared"])
    assert seen["globex"] == (shared_v2, ["shared"])
    assert [t.name for t in tenants] == ["acme", "globex"]


def test_list_tenants_excludes_public_tenant(backend: Backend) -> None:
    async def body(store: Store):
        before = await store.list_tenants()
        public = await store.ensure_public_tenant()
        await store.ensure_tenant("zeta")
        await store.create_tenant("_a")  # sorts next to "__public__"
        return before, public, await store.list_tenants(), await store.get_tenant(public.id)

    before, public, tenants, fetched = backend.run(body)
    assert before == []
    assert [t.name for t in tenants] == ["_a", "zeta"]
    assert fetched == public


def test_public_tenant_name_is_reserved(backend: Backend) -> None:
    async def body(store: Store):
        with pytest.raises(ValueError, match="reserved"):
            await store.ensure_tenant(PUBLIC_TENANT_NAME)
        with pytest.raises(ValueError, match="reserved"):
            await store.create_tenant(PUBLIC_TENANT_NAME)
        return await store.list_tenants(), await store.ensure_public_tenant()

    tenants, public = backend.run(body)
    assert tenants == []
    assert public.quotas == Quotas()


def test_public_tenant_quotas_and_keys_work(backend: Backend) -> None:
    async def body(store: Store):
        public = await store.ensure_public_tenant()
        limited = await store.set_quotas(public.id, Quotas(max_adapters=1))
        await store.create_adapter(public.id, new_adapter("one"))
        with pytest.raises(QuotaExceeded):
            await store.create_adapter(public.id, new_adapter("two"))
        key = await store.create_api_key(public.id, key_hash="pub", prefix="sk-p")
        return limited, key, await store.find_api_key("pub"), await store.ensure_public_tenant()

    limited, key, (found_key, found_tenant), public = backend.run(body)
    assert limited.quotas.max_adapters == 1 and public.quotas == limited.quotas
    assert found_key == key and found_tenant == public
