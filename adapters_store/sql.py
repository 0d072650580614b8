"""The store's SQL, written once for SQLite and PostgreSQL, and the mappers from its rows to records.

``Statements(dialect)`` builds every statement the store runs (bar the migrations) from a
``Dialect``: the few words in which the two databases differ are fields of that row of data, and
the two rows, ``SQLITE`` and ``POSTGRES``, stand side by side at the end of this module. Argument
``n`` is written ``?n`` (SQLite) or ``$n`` (PostgreSQL), so both drivers pass arguments by
position and a statement may use one argument twice.

The tables' columns are named once, below; their DDL is each dialect's numbered migrations
(``migrations.STEPS``, in ``sqlite.py`` and ``postgres.py``), since a shipped step is never
edited. Both create the same tables and columns, which is all the statements rely on.

Values: a job hands in Python values (``datetime``, ``bool``) and the driver stores them as its
database wants them (SQLite: fixed-width UTC ISO text and 0/1). Reading back, the mappers below
turn a stored time into a ``datetime`` with the dialect's ``read_time``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Protocol

from .models import AdapterRecord, ApiKey, Quotas, Tenant

# Columns read back, the same in both schemas. Each quota is stored in a column named after its
# ``Quotas`` field, so a new quota is a field plus one migration step per dialect.
ADAPTER_COLUMNS = "id, tenant_id, name, version, tokens, params, bytes, sha256, base_model, public, created_at"
API_KEY_COLUMNS = "id, tenant_id, prefix, created_at, revoked_at"
QUOTA_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Quotas))
_TENANT_COLUMN_NAMES = ("id", "name", "created_at", *QUOTA_COLUMNS)
TENANT_COLUMNS = ", ".join(_TENANT_COLUMN_NAMES)


@dataclass(frozen=True)
class Dialect:
    """What one database spells differently in the store's statements."""

    #: ``?`` or ``$``: argument ``n`` is written ``{mark}{n}``.
    mark: str
    #: The ``public`` column as a condition. SQLite's partial index ``adapters_public_by_name``
    #: serves only the very term its ``WHERE`` names.
    public: str
    #: Whether any row of a group is public, as an aggregate that is false for no rows.
    any_public: str
    #: Column type of a point in time (``schema_migrations.applied_at``).
    timestamp: str
    #: A stored point in time (a column of that type) as an aware ``datetime``.
    read_time: Callable[[Any], datetime]
    #: Whether an argument that may be NULL needs its type spelled out (asyncpg infers types).
    typed_null_args: bool = False
    # Locks, for a database that lets writers run side by side. Their default, no lock, is right
    # where a write transaction holds the whole database's write lock.
    #: Appended to the read of the tenant row whose usage a create counts: a lock until commit.
    lock_tenant: str = ""
    #: Appended to the tenant check before inserting an API key (the foreign key's own lock).
    share_tenant: str = ""
    #: A statement of arguments (tenant id, name) that serialises the creators of one name until
    #: commit.
    lock_name: str | None = None
    #: A statement that serialises migrating processes until commit.
    lock_migrations: str | None = None

    def arg(self, n: int, sql_type: str | None = None) -> str:
        """Argument ``n``; ``sql_type`` names the type of one that may be NULL."""
        mark = f"{self.mark}{n}"
        return f"{mark}::{sql_type}" if sql_type and self.typed_null_args else mark

    def args(self, count: int) -> str:
        """Arguments 1 to ``count``, for a ``VALUES`` list."""
        return ", ".join(self.arg(n) for n in range(1, count + 1))


class Statements:
    """Every statement of the store in one dialect; built once per driver, at import."""

    def __init__(self, d: Dialect) -> None:
        self.dialect = d
        a = d.arg

        # Tenants. Tenant rows always come back whole (``TENANT_COLUMNS``).
        self.tenant_by_id = f"SELECT {TENANT_COLUMNS} FROM tenants WHERE id = {a(1)}"
        self.tenant_by_name = f"SELECT {TENANT_COLUMNS} FROM tenants WHERE name = {a(1)}"
        self.tenants_other_than = f"SELECT {TENANT_COLUMNS} FROM tenants WHERE name <> {a(1)} ORDER BY name"
        self.tenant_exists = f"SELECT 1 FROM tenants WHERE id = {a(1)}"
        #: Before inserting an API key; the lock (if any) is the one the foreign key takes anyway.
        self.tenant_exists_for_key = self.tenant_exists + d.share_tenant
        #: Before a create counts the tenant's usage (see ``jobs.create_adapter``).
        self.tenant_for_create = self.tenant_by_id + d.lock_tenant
        #: Arguments (id, name, created_at): a tenant without quotas; does nothing when the name is taken.
        self.insert_bare_tenant = (
            f"INSERT INTO tenants (id, name, created_at) VALUES ({d.args(3)}) ON CONFLICT (name) DO NOTHING"
        )
        #: Arguments (id, name, created_at, *quota_values); returns the row, or none when the name is taken.
        self.insert_tenant = (
            f"INSERT INTO tenants ({TENANT_COLUMNS}) VALUES ({d.args(len(_TENANT_COLUMN_NAMES))})"
            f" ON CONFLICT (name) DO NOTHING RETURNING {TENANT_COLUMNS}"
        )
        #: Arguments (*quota_values, tenant_id); returns the row.
        sets = ", ".join(f"{column} = {a(n)}" for n, column in enumerate(QUOTA_COLUMNS, 1))
        self.set_quotas = f"UPDATE tenants SET {sets} WHERE id = {a(len(QUOTA_COLUMNS) + 1)} RETURNING {TENANT_COLUMNS}"

        # API keys.
        #: Arguments (id, tenant_id, key_hash, prefix, created_at); returns the row, or none when
        #: the hash is stored already.
        self.insert_api_key = (
            f"INSERT INTO api_keys (id, tenant_id, key_hash, prefix, created_at) VALUES ({d.args(5)})"
            f" ON CONFLICT (key_hash) DO NOTHING RETURNING {API_KEY_COLUMNS}"
        )
        #: The key lookup on every authenticated request: the live key of a hash, joined with its
        #: tenant's row (key columns renamed); served by the index api_keys_by_hash.
        tenant = ", ".join(f"t.{column}" for column in _TENANT_COLUMN_NAMES)
        self.find_api_key = (
            "SELECT k.id AS key_id, k.tenant_id, k.prefix, k.created_at AS key_created_at,"
            f" k.revoked_at, {tenant}"
            " FROM api_keys AS k JOIN tenants AS t ON t.id = k.tenant_id"
            f" WHERE k.key_hash = {a(1)} AND k.revoked_at IS NULL"
        )
        self.api_keys_of = f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE tenant_id = {a(1)} ORDER BY created_at, id"
        #: Arguments (revoked_at, id). COALESCE keeps the first revocation time.
        self.revoke_api_key = (
            f"UPDATE api_keys SET revoked_at = COALESCE(revoked_at, {a(1)})"
            f" WHERE id = {a(2)} RETURNING {API_KEY_COLUMNS}"
        )

        # Adapters.
        self.lock_name = d.lock_name
        self.usage = (
            f"SELECT COUNT(*) AS count, COALESCE(SUM(bytes), 0) AS bytes FROM adapters WHERE tenant_id = {a(1)}"
        )
        #: Arguments (tenant_id, name): the highest version and whether the name is public.
        self.latest = (
            f"SELECT COALESCE(MAX(version), 0) AS version, {d.any_public} AS public"
            f" FROM adapters WHERE tenant_id = {a(1)} AND name = {a(2)}"
        )
        self.insert_adapter = f"INSERT INTO adapters ({ADAPTER_COLUMNS}) VALUES ({d.args(11)})"
        self.insert_blob = f"INSERT INTO adapter_blobs (adapter_id, blob) VALUES ({d.args(2)})"
        self.blob = f"SELECT blob FROM adapter_blobs WHERE adapter_id = {a(1)}"
        #: Arguments (tenant_id, name, version or NULL for all). Blobs go with their rows through
        #: ON DELETE CASCADE; the deleted rows come back in no particular order.
        self.delete_versions = (
            f"DELETE FROM adapters WHERE tenant_id = {a(1)} AND name = {a(2)}"
            f" AND ({a(3, 'integer')} IS NULL OR version = {a(3, 'integer')})"
            f" RETURNING {ADAPTER_COLUMNS}"
        )
        #: Arguments (public, tenant_id, name).
        self.set_public = f"UPDATE adapters SET public = {a(1)} WHERE tenant_id = {a(2)} AND name = {a(3)}"

        # Visible adapters, ranked per name: rank 1 is the newest version of the owner the name
        # resolves to (the caller itself first, else the earliest publisher); see base.py.
        # Argument 1 is the caller's tenant id; ``name_filter`` narrows the candidates first.
        def ranked(name_filter: str) -> str:
            return f"""
WITH candidates AS (
    SELECT {ADAPTER_COLUMNS},
           CASE WHEN tenant_id = {a(1)} THEN 0 ELSE 1 END AS foreign_owner,
           MIN(created_at) OVER (PARTITION BY name, tenant_id) AS owner_since
    FROM adapters
    WHERE (tenant_id = {a(1)} OR {d.public}) AND {name_filter}
),
ranked AS (
    SELECT *,
           ROW_NUMBER() OVER (
               PARTITION BY name
               ORDER BY foreign_owner, owner_since, tenant_id, version DESC
           ) AS rank
    FROM candidates
)
"""

        #: Arguments (tenant_id, name, version or NULL for all): the versions the name resolves
        #: to, ascending. The lookup behind every request's adapter name.
        self.resolved_versions = ranked(f"name = {a(2)}") + (
            f"SELECT {ADAPTER_COLUMNS} FROM ranked\n"
            "WHERE tenant_id = (SELECT tenant_id FROM ranked WHERE rank = 1)\n"
            f"  AND ({a(3, 'integer')} IS NULL OR version = {a(3, 'integer')})\n"
            "ORDER BY version\n"
        )
        #: Arguments (tenant_id, cursor name or NULL, limit): the newest version of each visible
        #: name after the cursor, by name.
        self.list_newest = ranked(f"({a(2, 'text')} IS NULL OR name > {a(2, 'text')})") + (
            f"SELECT {ADAPTER_COLUMNS} FROM ranked\nWHERE rank = 1\nORDER BY name\nLIMIT {a(3)}\n"
        )

        # Migrations (see migrations.py).
        self.lock_migrations = d.lock_migrations
        self.create_migrations_table = (
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            f" version INTEGER PRIMARY KEY, applied_at {d.timestamp} NOT NULL)"
        )
        self.applied_migrations = "SELECT version FROM schema_migrations"
        self.record_migration = f"INSERT INTO schema_migrations (version, applied_at) VALUES ({d.args(2)})"


# Rows to records.


class Row(Protocol):
    """A result row read by column name (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str, /) -> Any: ...


def quota_values(quotas: Quotas) -> tuple[int | None, ...]:
    """The quota columns' values, in ``QUOTA_COLUMNS`` order."""
    return tuple(getattr(quotas, column) for column in QUOTA_COLUMNS)


def adapter_values(record: AdapterRecord) -> tuple[object, ...]:
    """The adapter columns' values, in ``ADAPTER_COLUMNS`` order."""
    return (
        record.id,
        record.tenant_id,
        record.name,
        record.version,
        record.tokens,
        record.params,
        record.bytes,
        record.sha256,
        record.base_model,
        record.public,
        record.created_at,
    )


def tenant_from_row(row: Row, d: Dialect) -> Tenant:
    """A row holding the tenant columns."""
    return Tenant(
        id=row["id"],
        name=row["name"],
        created_at=d.read_time(row["created_at"]),
        quotas=Quotas(**{column: row[column] for column in QUOTA_COLUMNS}),
    )


def api_key_from_row(row: Row, d: Dialect) -> ApiKey:
    """A row holding the API key columns."""
    return ApiKey(
        id=row["id"],
        tenant_id=row["tenant_id"],
        prefix=row["prefix"],
        created_at=d.read_time(row["created_at"]),
        revoked=row["revoked_at"] is not None,
    )


def found_api_key_from_row(row: Row, d: Dialect) -> tuple[ApiKey, Tenant]:
    """A row of ``Statements.find_api_key``: the live key and its tenant."""
    key = ApiKey(
        id=row["key_id"],
        tenant_id=row["tenant_id"],
        prefix=row["prefix"],
        created_at=d.read_time(row["key_created_at"]),
        revoked=False,
    )
    return key, tenant_from_row(row, d)


def adapter_from_row(row: Row, d: Dialect) -> AdapterRecord:
    """A row holding the adapter columns."""
    return AdapterRecord(
        id=row["id"],
        tenant_id=row["tenant_id"],
        name=row["name"],
        version=row["version"],
        tokens=row["tokens"],
        params=row["params"],
        bytes=row["bytes"],
        sha256=row["sha256"],
        base_model=row["base_model"],
        public=bool(row["public"]),
        created_at=d.read_time(row["created_at"]),
    )


# The two dialects.

#: SQLite: one writer at a time (``BEGIN IMMEDIATE`` holds the database's write lock for a whole
#: write transaction), so no locks; times are fixed-width UTC ISO text (see ``sqlite._bind``).
SQLITE = Dialect(
    mark="?",
    public="public = 1",
    any_public="COALESCE(MAX(public), 0)",
    timestamp="TEXT",
    read_time=datetime.fromisoformat,
)

#: Key of PostgreSQL's database-wide advisory lock held while migrating (the one-bigint key
#: space; per-name locks use the separate two-int4 key space).
MIGRATION_LOCK_KEY = 0x616C69676E6572  # "aligner"

#: PostgreSQL: replicas write side by side, so creates lock the tenant row (``FOR NO KEY UPDATE``
#: serialises one tenant's creates and does not block the ``FOR KEY SHARE`` of foreign key checks)
#: and the (tenant, name) pair (a transaction-scoped advisory lock), and migrations take a
#: database-wide advisory lock.
POSTGRES = Dialect(
    mark="$",
    typed_null_args=True,
    public="public",
    any_public="COALESCE(BOOL_OR(public), FALSE)",
    timestamp="TIMESTAMPTZ",
    read_time=lambda moment: moment,  # asyncpg returns TIMESTAMPTZ as an aware datetime
    lock_tenant=" FOR NO KEY UPDATE",
    share_tenant=" FOR KEY SHARE",
    lock_name="SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))",
    lock_migrations=f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})",
)
