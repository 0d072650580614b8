"""The adapter store at scale: 1,000,000 adapters on SQLite and on PostgreSQL.

For each backend, in a fresh temporary SQLite file or a throwaway PostgreSQL database (dropped afterwards):

1. Tenants: ``count / per_tenant`` of them (default 1,000 x 1,000 adapters), created through the store API.
   The first is the reserved ``__public__`` tenant (all its adapters public); in the others 1% of the names
   are published. Names come from a shared pool of 20,000, so a name exists in ~45 tenants (shadowing and
   public resolution are exercised); 10% of the names have a second version.
2. Bulk insert of all but ``--api-sample`` rows, straight into the schema that the store's own migrations
   created (the store is opened first, so the tables, indexes and constraints are exactly the server's):
   SQLite ``executemany`` in transactions of ``--batch`` rows on a second connection to the same file;
   PostgreSQL ``COPY`` (asyncpg ``copy_records_to_table``) in transactions of ``--batch`` rows. Inserting one
   million rows one by one through ``create_adapter`` (one transaction and fsync each) would take hours, so:
3. API insert: the remaining ``--api-sample`` rows (default 2,000, spread over the tenants) go through
   ``Store.create_adapter``, one at a time, into the already full store; that rate is reported separately.
4. Lookups: ``Store.get_adapter(tenant_id, name)``, the call ``server/resolver.py`` makes on a cache miss
   to resolve a request's adapter name, ``--lookups`` times (default 10,000), one at a time, random tenants
   and names, after ``--warmup`` untimed ones. Mix: 85% an owned name (newest version), 5% an owned name at
   a pinned version, 5% a public name the caller does not own, 5% a name nobody has (``NotFound``). Every
   answer is checked. PostgreSQL gets ``ANALYZE`` after the bulk load (what autovacuum would soon do).
   Interleaved with each store call, in rotating order so all see the same machine: the same SQL on a direct
   connection (no store layer, pool or worker thread), and a bare round trip (SQLite: a no-op job on a
   one-thread executor, the store's model; PostgreSQL: ``SELECT 1``). On a shared, oversubscribed machine
   the p99 is set by how fast a woken thread or server process gets a CPU; these two floors show how much.

Blobs: ``--distinct-blobs`` (default 64) real aligner/v1 files (``aligner_core.adapter_format.encode`` of
``Adapter.random`` on the SmolLM2-135M shape: 1 prefix token x 576, gates 28 x 9, float32: 3,744 bytes),
reused round robin; every row stores its own copy and the sha256 of its blob (the store checks it).

    python bench/store_scale.py --quick                 # 100,000 adapters (100 tenants x 1,000)
    python bench/store_scale.py                         # 1,000,000 adapters (1,000 tenants x 1,000)
    python bench/store_scale.py --backends sqlite --count 200000

PostgreSQL: ``--postgres-url`` or ``$ALIGNER_TEST_POSTGRES_URL`` (``deploy/dev/postgres.sh`` prints one); the
role needs CREATEDB. Without a URL the PostgreSQL half is skipped with a message. Writes
``bench/results/store-scale[-quick].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adapters_store import PUBLIC_TENANT_NAME, NewAdapter, NotFound, Store, open_store  # noqa: E402
from adapters_store import sql as store_sql  # noqa: E402

RESULTS = ROOT / "bench" / "results"
POSTGRES_URL_ENV = "ALIGNER_TEST_POSTGRES_URL"
TARGET_P99_MS = 2.0
NAME_POOL = 20_000
PURPOSES = (
    "support",
    "summarize",
    "legal",
    "tone",
    "sql",
    "translate",
    "medical",
    "code",
    "sales",
    "tutor",
    "review",
    "extract",
    "classify",
    "rewrite",
    "persona",
    "safety",
    "finance",
    "retail",
    "hr",
    "travel",
)
STYLES = ("formal", "casual", "terse", "friendly", "pirate", "concise", "verbose", "neutral", "brand", "kids")
# The bulk load writes the store's own adapter columns, in the store's order.
ADAPTER_COLUMNS = tuple(column.strip() for column in store_sql.ADAPTER_COLUMNS.split(","))


def pool_name(i: int) -> str:
    return f"{PURPOSES[i % len(PURPOSES)]}-{STYLES[(i // len(PURPOSES)) % len(STYLES)]}-{i:05d}"


# The workload: who owns which names, decided up front and identical for every backend.


@dataclass
class TenantPlan:
    index: int
    name: str
    public_tenant: bool
    names: list[int]  # pool indexes, the tenant's distinct names
    v2: int  # names[:v2] have two versions
    published: int  # names[:published] are public (all of them for __public__)
    api: int  # names[-api:] are inserted through create_adapter, not in bulk
    tenant_id: str = ""

    @property
    def rows(self) -> int:
        return len(self.names) + self.v2


@dataclass
class Workload:
    tenants: list[TenantPlan]
    blobs: list[tuple[bytes, str]]  # (blob, sha256)
    tokens: int
    params: int
    base_model: str
    public_names: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(t.rows for t in self.tenants)


def make_blobs(n: int) -> tuple[list[tuple[bytes, str]], int, int, str]:
    """``n`` distinct real aligner/v1 files of the SmolLM2-135M shape (3,744 bytes each)."""
    from aligner_core.adapter_format import Adapter, encode
    from aligner_core.model_spec import ModelSpec

    spec = ModelSpec(
        name="SmolLM2-135M-Instruct",
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        fingerprint="bench0store0",
    )
    blobs, adapter = [], None
    for seed in range(n):
        adapter = Adapter.random(spec, tokens=1, seed=seed)
        data = encode(adapter)
        blobs.append((data, hashlib.sha256(data).hexdigest()))
    assert adapter is not None
    return blobs, adapter.tokens, adapter.params, spec.identity


def plan(count: int, per_tenant: int, api_sample: int, distinct_blobs: int, seed: int) -> Workload:
    rng = random.Random(seed)
    n_tenants = max(2, -(-count // per_tenant))
    sizes = [count // n_tenants + (1 if i < count % n_tenants else 0) for i in range(n_tenants)]
    regular = n_tenants - 1
    api_each = [api_sample // regular + (1 if i < api_sample % regular else 0) for i in range(regular)]
    tenants = []
    for i, rows in enumerate(sizes):
        v2 = rows // 10
        names = rng.sample(range(NAME_POOL), rows - v2)
        public_tenant = i == 0
        published = len(names) if public_tenant else max(1, len(names) // 100)
        api = 0 if public_tenant else api_each[i - 1]
        if api > len(names) - max(v2, published):
            raise SystemExit(f"--api-sample {api_sample} is too large for {rows} adapters per tenant")
        tenants.append(
            TenantPlan(
                i, PUBLIC_TENANT_NAME if public_tenant else f"tenant-{i:05d}", public_tenant, names, v2, published, api
            )
        )
    blobs, tokens, params, base_model = make_blobs(distinct_blobs)
    public = sorted({n for t in tenants for n in t.names[: t.published]})
    return Workload(tenants, blobs, tokens, params, base_model, public)


def bulk_rows(w: Workload, start: datetime):
    """Every bulk row as (adapter columns..., blob), in creation order (version 2 after version 1)."""
    seq = 0
    for t in w.tenants:
        bulk = len(t.names) - t.api
        for version, names in ((1, t.names[:bulk]), (2, t.names[: t.v2])):
            for j, n in enumerate(names):
                blob, sha = w.blobs[seq % len(w.blobs)]
                public = j < t.published
                created = start + timedelta(microseconds=seq)
                seq += 1
                yield (
                    f"ad_{uuid.uuid4().hex}",
                    t.tenant_id,
                    pool_name(n),
                    version,
                    w.tokens,
                    w.params,
                    len(blob),
                    sha,
                    w.base_model,
                    public,
                    created,
                    blob,
                )


def api_rows(w: Workload) -> list[tuple[TenantPlan, NewAdapter]]:
    out = []
    for t in w.tenants:
        for k, n in enumerate(t.names[len(t.names) - t.api :]):
            blob, sha = w.blobs[(t.index + k) % len(w.blobs)]
            out.append(
                (
                    t,
                    NewAdapter(
                        name=pool_name(n),
                        blob=blob,
                        tokens=w.tokens,
                        params=w.params,
                        sha256=sha,
                        base_model=w.base_model,
                    ),
                )
            )
    random.Random(1).shuffle(out)  # interleave tenants, as uploads would
    return out


def chunks(it, size: int):
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# Backends: how to bulk load, size on disk, the lookup's query plan.


def _utc_text(moment: datetime) -> str:  # the SQLite backend's fixed-width timestamp text
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


class SQLiteBench:
    kind = "sqlite"

    def __init__(self, tmp_root: str | None) -> None:
        self.dir = tempfile.mkdtemp(prefix="store-scale-", dir=tmp_root)
        self.path = os.path.join(self.dir, "store.db")
        self.url = f"sqlite:///{self.path}"

    def __enter__(self) -> SQLiteBench:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    async def bulk_load(self, rows, batch: int, progress) -> None:
        def load() -> None:
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                conn.execute("PRAGMA foreign_keys = ON")  # as the store runs: every row's FK is checked
                conn.execute("PRAGMA cache_size = -262144")  # 256 MiB for the random-key index inserts
                ins_a = f"INSERT INTO adapters ({', '.join(ADAPTER_COLUMNS)}) VALUES ({', '.join('?' * 11)})"
                ins_b = "INSERT INTO adapter_blobs (adapter_id, blob) VALUES (?, ?)"
                for part in chunks(rows, batch):
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany(ins_a, [(*r[:9], int(r[9]), _utc_text(r[10])) for r in part])
                    conn.executemany(ins_b, [(r[0], r[11]) for r in part])
                    conn.execute("COMMIT")
                    progress.update(len(part))
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()

        await asyncio.to_thread(load)

    async def after_load(self) -> None:
        pass

    def size_bytes(self) -> dict:
        files = {p.name: p.stat().st_size for p in Path(self.dir).iterdir()}
        return {"total": sum(files.values()), "files": files}

    def info(self) -> dict:
        return {"sqlite_version": sqlite3.sqlite_version, "page_cache": "default (store connection)"}

    async def raw_query(self):
        """The store's lookup SQL on a direct connection, run inline (no worker thread, no store layer),
        and a no-op round trip to a worker thread like the store's: the cost of the hop alone."""
        from adapters_store.sqlite import SQL

        conn = sqlite3.connect(self.path)

        async def query(tenant_id: str, name: str, version: int | None) -> list:
            return conn.execute(SQL.resolved_versions, (tenant_id, name, version)).fetchall()

        hop_thread = ThreadPoolExecutor(max_workers=1)  # the store's own model: one worker thread

        async def hop() -> None:
            await asyncio.get_running_loop().run_in_executor(hop_thread, int)

        async def close() -> None:
            conn.close()
            hop_thread.shutdown()

        return query, hop, close

    def plan(self, tenant_id: str, name: str) -> list[str]:
        from adapters_store.sqlite import SQL

        conn = sqlite3.connect(self.path)
        try:
            rows = conn.execute("EXPLAIN QUERY PLAN " + SQL.resolved_versions, (tenant_id, name, None)).fetchall()
            return [r[3] for r in rows]
        finally:
            conn.close()


class PostgresBench:
    kind = "postgresql"

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.db = f"aligner_scale_{uuid.uuid4().hex[:12]}"
        parts = urlsplit(base_url)
        self.url = urlunsplit(parts._replace(path=f"/{self.db}"))

    async def _admin(self, statement: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.base_url, timeout=10)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    def __enter__(self) -> PostgresBench:
        asyncio.run(self._admin(f'CREATE DATABASE "{self.db}"'))
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run(self._drop())

    async def _drop(self) -> None:
        """Drop the scratch database. After a million inserts an autovacuum worker is often busy in it: WITH
        (FORCE) may not end it without the pg_signal_backend role, while a plain DROP DATABASE asks
        autovacuum to leave on its own, so that is tried (a few times) when FORCE is refused."""
        import asyncpg

        try:
            return await self._admin(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        except asyncpg.InsufficientPrivilegeError:
            pass
        for attempt in range(10):
            try:
                return await self._admin(f'DROP DATABASE IF EXISTS "{self.db}"')
            except asyncpg.ObjectInUseError:
                await asyncio.sleep(1 + attempt)
        print(f"warning: could not drop scratch database {self.db}; drop it by hand", file=sys.stderr)

    async def _conn(self):
        import asyncpg

        return await asyncpg.connect(self.url, timeout=10)

    async def bulk_load(self, rows, batch: int, progress) -> None:
        conn = await self._conn()
        try:
            for part in chunks(rows, batch):
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        "adapters", records=[r[:11] for r in part], columns=ADAPTER_COLUMNS
                    )
                    await conn.copy_records_to_table(
                        "adapter_blobs", records=[(r[0], r[11]) for r in part], columns=("adapter_id", "blob")
                    )
                progress.update(len(part))
        finally:
            await conn.close()

    async def after_load(self) -> None:
        conn = await self._conn()
        try:
            await conn.execute("ANALYZE")
        finally:
            await conn.close()

    def size_bytes(self) -> dict:
        async def main() -> dict:
            conn = await self._conn()
            try:
                total = await conn.fetchval("SELECT pg_database_size(current_database())")
                tables = {
                    r["t"]: r["size"]
                    for r in await conn.fetch(
                        "SELECT c.relname AS t, pg_total_relation_size(c.oid) AS size FROM pg_class c"
                        " JOIN pg_namespace n ON n.oid = c.relnamespace"
                        " WHERE n.nspname = current_schema() AND c.relkind = 'r'"
                    )
                }
                indexes = {
                    r["i"]: r["size"]
                    for r in await conn.fetch(
                        "SELECT indexrelid::regclass::text AS i, pg_relation_size(indexrelid) AS size"
                        " FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
                        " WHERE c.relname IN ('adapters', 'adapter_blobs')"
                    )
                }
                return {"total": total, "tables": tables, "indexes": indexes}
            finally:
                await conn.close()

        return asyncio.run(main())

    def info(self) -> dict:
        async def main() -> dict:
            conn = await self._conn()
            try:
                names = (
                    "server_version",
                    "shared_buffers",
                    "effective_cache_size",
                    "work_mem",
                    "max_wal_size",
                    "synchronous_commit",
                )
                return {n: await conn.fetchval(f"SHOW {n}") for n in names}
            finally:
                await conn.close()

        return asyncio.run(main())

    async def raw_query(self):
        """The store's lookup SQL on one direct asyncpg connection (no pool, no store layer), and
        ``SELECT 1`` on it: the cost of a round trip to the server process alone."""
        from adapters_store.postgres import SQL

        conn = await self._conn()

        async def query(tenant_id: str, name: str, version: int | None) -> list:
            return await conn.fetch(SQL.resolved_versions, tenant_id, name, version)

        async def hop() -> None:
            await conn.fetchval("SELECT 1")

        return query, hop, conn.close

    def plan(self, tenant_id: str, name: str) -> list[str]:
        from adapters_store.postgres import SQL

        async def main() -> list[str]:
            conn = await self._conn()
            try:
                rows = await conn.fetch(
                    "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + SQL.resolved_versions, tenant_id, name, None
                )
                return [r[0] for r in rows]
            finally:
                await conn.close()

        return asyncio.run(main())


# Measurements.


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary_ms(xs: list[float]) -> dict:
    return {
        "n": len(xs),
        "p50_ms": percentile(xs, 0.50),
        "p90_ms": percentile(xs, 0.90),
        "p99_ms": percentile(xs, 0.99),
        "p999_ms": percentile(xs, 0.999),
        "max_ms": max(xs),
        "mean_ms": sum(xs) / len(xs),
    }


def lookup_targets(w: Workload, n: int, seed: int) -> list[tuple[str, TenantPlan, str, int | None, int | None]]:
    """(kind, caller, name, version asked, version expected or None for NotFound / public)."""
    rng = random.Random(seed)
    regular = w.tenants[1:]
    public_set = set(w.public_names)
    out = []
    for _ in range(n):
        r = rng.random()
        t = rng.choice(regular)
        if r < 0.90:
            j = rng.randrange(len(t.names))
            pinned = r >= 0.85
            newest = 2 if j < t.v2 else 1
            version = rng.randint(1, newest) if pinned else None
            out.append(("owned_pinned" if pinned else "owned", t, pool_name(t.names[j]), version, version or newest))
        elif r < 0.95:
            owned = set(t.names)
            while (n_pub := rng.choice(w.public_names)) in owned:
                pass
            assert n_pub in public_set
            out.append(("public", t, pool_name(n_pub), None, None))
        else:
            out.append(("missing", t, f"missing-{rng.randrange(10**9):09d}", None, None))
    return out


async def run_lookups(store: Store, raw, hop, targets, warmup: int):
    """Per target, time ``store.get_adapter``, the same SQL on a direct connection, and a bare round trip
    (worker thread hop / ``SELECT 1``), in rotating order so that all three see the same machine."""
    times: dict[str, list[float]] = {}
    floor: list[float] = []
    hops: list[float] = []
    errors = 0
    for i, (kind, t, name, version, expect) in enumerate(targets):
        got: dict[str, float] = {}
        rec = None
        for step in ("store", "raw", "hop")[i % 3 :] + ("store", "raw", "hop")[: i % 3]:
            t0 = time.perf_counter_ns()
            if step == "store":
                try:
                    rec = await store.get_adapter(t.tenant_id, name, version)
                except NotFound:
                    rec = None
            elif step == "raw":
                await raw(t.tenant_id, name, version)
            else:
                await hop()
            got[step] = (time.perf_counter_ns() - t0) / 1e6
        if kind == "missing":
            ok = rec is None
        elif kind == "public":
            ok = rec is not None and rec.public and rec.name == name
        else:
            ok = rec is not None and rec.tenant_id == t.tenant_id and rec.name == name and rec.version == expect
        errors += not ok
        if i >= warmup:
            times.setdefault(kind, []).append(got["store"])
            floor.append(got["raw"])
            hops.append(got["hop"])
    return times, floor, hops, errors


def bench_backend(b, w: Workload, args) -> dict:
    from tqdm import tqdm

    result: dict = {"backend": b.kind, "count": w.count, "tenants": len(w.tenants)}

    async def setup() -> float:
        t0 = time.perf_counter()
        async with open_store(b.url) as store:  # runs the migrations: the server's exact schema
            for t in w.tenants:
                tenant = await (store.ensure_public_tenant() if t.public_tenant else store.ensure_tenant(t.name))
                t.tenant_id = tenant.id
        return time.perf_counter() - t0

    result["tenant_setup_s"] = asyncio.run(setup())

    n_bulk = w.count - sum(t.api for t in w.tenants)
    with tqdm(total=n_bulk, desc=f"{b.kind} bulk", unit="adapter", mininterval=2, smoothing=0.05) as bar:
        t0 = time.perf_counter()
        asyncio.run(b.bulk_load(bulk_rows(w, datetime.now(UTC)), args.batch, bar))
        bulk_s = time.perf_counter() - t0
    asyncio.run(b.after_load())
    result["bulk"] = {
        "rows": n_bulk,
        "seconds": bulk_s,
        "adapters_per_s": n_bulk / bulk_s,
        "method": "sqlite3 executemany" if b.kind == "sqlite" else "COPY (asyncpg)",
        "batch": args.batch,
    }

    samples = api_rows(w)

    async def api_and_lookups():
        async with open_store(b.url) as store:
            t0 = time.perf_counter()
            for t, new in tqdm(samples, desc=f"{b.kind} create_adapter", unit="adapter", mininterval=2):
                rec = await store.create_adapter(t.tenant_id, new)
                assert rec.version == 1 and not rec.public, rec
            api_s = time.perf_counter() - t0
            count, _ = await store.count_usage(w.tenants[1].tenant_id)
            targets = lookup_targets(w, args.warmup + args.lookups, args.seed)
            raw, hop, close_raw = await b.raw_query()
            load_before = os.getloadavg()
            try:
                times, floor, hops, errors = await run_lookups(store, raw, hop, targets, args.warmup)
            finally:
                await close_raw()
            load = {"before": load_before, "after": os.getloadavg()}
            return api_s, times, floor, hops, errors, count, load

    api_s, times, floor, hops, errors, usage, load = asyncio.run(api_and_lookups())
    if usage != w.tenants[1].rows:
        raise SystemExit(f"{b.kind}: tenant 1 owns {usage} adapters, expected {w.tenants[1].rows}")
    if errors:
        raise SystemExit(f"{b.kind}: {errors} lookups returned a wrong answer")
    result["api"] = {
        "rows": len(samples),
        "seconds": api_s,
        "adapters_per_s": len(samples) / api_s if samples else None,
        "method": "Store.create_adapter, one at a time, into the full store",
    }
    every = [x for xs in times.values() for x in xs]
    result["lookup"] = {
        "call": "Store.get_adapter(tenant_id, name, version)",
        "warmup": args.warmup,
        "all": summary_ms(every),
        "by_kind": {k: summary_ms(v) for k, v in sorted(times.items())},
        "target_p99_ms": TARGET_P99_MS,
        "meets_target": percentile(every, 0.99) < TARGET_P99_MS,
        "cdf_ms": [percentile(every, q / 1000) for q in range(0, 1001, 5)],
        "floor": {
            "what": "the same SQL on a direct connection (no store layer, pool or worker"
            " thread), interleaved with the store calls",
            **summary_ms(floor),
            "cdf_ms": [percentile(floor, q / 1000) for q in range(0, 1001, 5)],
        },
        "hop": {
            "what": "a no-op job on a one-thread executor (the SQLite store's model)"
            if b.kind == "sqlite"
            else "SELECT 1 on a direct connection (one round trip to the server process)",
            **summary_ms(hops),
            "cdf_ms": [percentile(hops, q / 1000) for q in range(0, 1001, 5)],
        },
        "loadavg_1_5_15": load,
    }
    result["db_size"] = b.size_bytes()
    result["server"] = b.info()
    t = w.tenants[1]
    result["query_plan"] = b.plan(t.tenant_id, pool_name(t.names[0]))
    return result


# Report.


def hardware() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "ram_bytes": ram,
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in results if "lookup" in r]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    labels = [r["backend"] for r in ran]
    x = range(len(ran))

    ax = axes[0]
    bulk = [r["bulk"]["adapters_per_s"] for r in ran]
    api = [r["api"]["adapters_per_s"] or 0 for r in ran]
    ax.bar([i - 0.2 for i in x], bulk, 0.4, label="bulk load")
    ax.bar([i + 0.2 for i in x], api, 0.4, label="Store.create_adapter")
    for i in x:
        ax.text(i - 0.2, bulk[i], f"{bulk[i]:,.0f}", ha="center", va="bottom", fontsize=8)
        ax.text(i + 0.2, api[i], f"{api[i]:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(top=max(bulk) * 8)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("adapters / s")
    ax.set_title("insert rate")
    ax.legend(fontsize=8)

    ax = axes[1]
    stats = ("p50_ms", "p99_ms", "max_ms")
    for k, s in enumerate(stats):
        vals = [r["lookup"]["all"][s] for r in ran]
        ax.bar([i + (k - 1) * 0.27 for i in x], vals, 0.27, label=s.replace("_ms", ""))
        for i in x:
            ax.text(i + (k - 1) * 0.27, vals[i], f"{vals[i]:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(TARGET_P99_MS, color="red", ls="--", lw=1, label=f"p99 target {TARGET_P99_MS} ms")
    ax.set_yscale("log")
    ax.set_ylim(top=max(r["lookup"]["all"]["max_ms"] for r in ran) * 8)  # room for the legend
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("ms")
    ax.set_title("get_adapter latency (one at a time)")
    ax.legend(fontsize=8, ncol=2)

    ax = axes[2]
    qs = [q / 1000 for q in range(0, 1001, 5)]
    for k, r in enumerate(ran):
        hop = "no-op thread hop" if r["backend"] == "sqlite" else "SELECT 1"
        curves = (  # (cdf, line style, width, what); None: matplotlib's default
            (r["lookup"]["cdf_ms"], None, None, "Store.get_adapter"),
            (r["lookup"]["floor"]["cdf_ms"], "--", 1, "same SQL, direct connection"),
            (r["lookup"]["hop"]["cdf_ms"], ":", 1, hop),
        )
        for cdf, ls, lw, what in curves:
            ax.plot(cdf, qs, color=f"C{k}", ls=ls, lw=lw, label=f"{r['backend']}: {what}")
    ax.axvline(TARGET_P99_MS, color="red", ls="--", lw=1)
    ax.axhline(0.99, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of lookups")
    ax.set_title("get_adapter latency CDF")
    ax.legend(fontsize=8)

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1_000_000, help="adapters in total (default 1,000,000)")
    ap.add_argument("--quick", action="store_true", help="100,000 adapters; writes store-scale-quick.*")
    ap.add_argument("--backends", default="sqlite,postgresql", help="comma separated: sqlite,postgresql")
    ap.add_argument(
        "--postgres-url",
        default=os.environ.get(POSTGRES_URL_ENV, ""),
        help=f"server to create the throwaway database on (default ${POSTGRES_URL_ENV})",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--per-tenant", type=int, default=1_000, help="adapters per tenant (default 1,000)")
    ap.add_argument("--api-sample", type=int, default=2_000, help="adapters inserted via create_adapter")
    ap.add_argument("--lookups", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=500, help="untimed lookups first")
    ap.add_argument("--distinct-blobs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=5_000, help="bulk rows per transaction")
    ap.add_argument("--tmpdir", default=None, help="where the temporary SQLite file goes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.count = 100_000
    suffix = "-quick" if args.quick else ("" if args.count == 1_000_000 else f"-{args.count}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"sqlite", "postgresql"}
    if unknown:
        ap.error(f"unknown backends {sorted(unknown)}")

    started = time.perf_counter()
    t0 = time.perf_counter()
    w = plan(args.count, args.per_tenant, args.api_sample, args.distinct_blobs, args.seed)
    print(
        f"workload: {w.count:,} adapters, {len(w.tenants):,} tenants ({w.tenants[1].rows} each),"
        f" {len(w.public_names):,} public names, {len(w.blobs)} distinct {len(w.blobs[0][0]):,}-byte"
        f" aligner/v1 blobs (planned in {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )

    results = []
    for kind in backends:
        t0 = time.perf_counter()
        if kind == "postgresql" and not args.postgres_url:
            msg = (
                f"skipped: no --postgres-url and ${POSTGRES_URL_ENV} is not set"
                " (run deploy/dev/postgres.sh as root and pass the URL it prints)"
            )
            print(f"postgresql: {msg}", flush=True)
            results.append({"backend": kind, "skipped": msg})
            continue
        ctx = SQLiteBench(args.tmpdir) if kind == "sqlite" else PostgresBench(args.postgres_url)
        with ctx as b:
            r = bench_backend(b, w, args)
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        lk = r["lookup"]["all"]
        print(
            f"{kind}: bulk {r['bulk']['adapters_per_s']:,.0f}/s, create_adapter {r['api']['adapters_per_s']:,.0f}/s;"
            f" get_adapter p50 {lk['p50_ms']:.3f} ms, p99 {lk['p99_ms']:.3f} ms, max {lk['max_ms']:.2f} ms;"
            f" {r['db_size']['total'] / 2**30:.2f} GiB on disk; {r['wall_s']:.0f} s",
            flush=True,
        )
        fl, hp, la = r["lookup"]["floor"], r["lookup"]["hop"], r["lookup"]["loadavg_1_5_15"]
        print(
            f"{kind}: same SQL on a direct connection p50 {fl['p50_ms']:.3f} ms, p99 {fl['p99_ms']:.3f} ms;"
            f" bare {'thread hop' if kind == 'sqlite' else 'SELECT 1'} p50 {hp['p50_ms']:.3f} ms,"
            f" p99 {hp['p99_ms']:.3f} ms; load average {la['before'][0]:.1f} -> {la['after'][0]:.1f}"
            f" on {os.cpu_count()} CPUs",
            flush=True,
        )

    hw = hardware()
    # The output folder is recorded relative to the repository, not this machine.
    out = {
        "benchmark": "store_scale",
        "args": {
            k: (os.path.relpath(v.resolve(), ROOT) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k != "postgres_url"
        },
        "hardware": hw,
        "workload": {
            "count": w.count,
            "tenants": len(w.tenants),
            "per_tenant": args.per_tenant,
            "name_pool": NAME_POOL,
            "public_names": len(w.public_names),
            "distinct_blobs": len(w.blobs),
            "blob_bytes": len(w.blobs[0][0]),
            "blob_format": "aligner/v1 (SmolLM2-135M shape, 1 token, float32)",
            "second_versions": sum(t.v2 for t in w.tenants),
        },
        "results": results,
        "wall_s": time.perf_counter() - started,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"store-scale{suffix}.json").write_text(json.dumps(out, indent=1) + "\n")
    title = (
        f"adapter store, {w.count:,} adapters over {len(w.tenants):,} tenants;"
        f" {hw['cpus']} x {hw['cpu_model']}, {hw['ram_gib']} GiB RAM"
    )
    plot(results, args.out / f"store-scale{suffix}.png", title)
    print(f"wrote {args.out / f'store-scale{suffix}.json'} and .png ({out['wall_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
