"""Versioned schema migrations, independent of SQL dialect.

The schema grows by the numbered ``STEPS`` below, the same in every dialect. Each
driver keeps its own tuple of ``Migration``s, one per step in that dialect's SQL
(``dialect_migrations``), and records applied versions in a
``schema_migrations(version INTEGER PRIMARY KEY, applied_at)`` table (``jobs.migrate``).
Steps are append-only: a shipped step is never edited, a change is a new step
(step 2 added tenant quotas and API keys over existing data), written for every
dialect.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import StoreConfigError

#: What each step does, in order: step ``n`` is ``STEPS[n - 1]``.
STEPS: tuple[str, ...] = (
    "tenants, adapters and adapter blobs",
    "tenant quotas and hashed api keys",
    "tenant quotas on generation requests",
    "fine-tuning files, jobs, events and checkpoints; tenant quotas on them",
)


@dataclass(frozen=True)
class Migration:
    """One schema step: a version number and the statements that reach it."""

    version: int
    description: str
    statements: tuple[str, ...]


def dialect_migrations(*statements: tuple[str, ...]) -> tuple[Migration, ...]:
    """One dialect's migrations: ``statements[n - 1]`` are its SQL for step ``n`` of ``STEPS``."""
    if len(statements) != len(STEPS):
        raise StoreConfigError(f"a dialect needs SQL for each of the {len(STEPS)} steps, got {len(statements)}")
    return tuple(
        Migration(version, description, step)
        for version, (description, step) in enumerate(zip(STEPS, statements, strict=True), 1)
    )


def check_ordered(migrations: Sequence[Migration]) -> None:
    """Fail fast if a backend's steps are not numbered 1, 2, 3, ... in order.

    A gap or duplicate would make "which steps are missing" ambiguous.
    """
    expected = list(range(1, len(migrations) + 1))
    actual = [m.version for m in migrations]
    if actual != expected:
        raise StoreConfigError(f"migrations must be numbered {expected}, got {actual}")


def pending(migrations: Sequence[Migration], applied: Iterable[int]) -> list[Migration]:
    """Return the steps not yet applied, in order.

    A database already at a version this code does not know was migrated by a
    newer release; running against it could corrupt data, so refuse.
    """
    check_ordered(migrations)
    done = set(applied)
    newest_known = len(migrations)
    unknown = sorted(v for v in done if v > newest_known)
    if unknown:
        raise StoreConfigError(
            f"database schema version {unknown[-1]} is newer than this code "
            f"supports ({newest_known}); upgrade the server"
        )
    return [m for m in migrations if m.version not in done]
