"""Trigram indexes for the free-text search of studios on PostgreSQL (issue 16).

`GET /studios?search=word` matches `lower(name)` or `lower(template_repository)`
containing the word (`LIKE '%word%'`), which no b-tree serves: every live studio of the
workspace was read and lowered twice (the count and the page), 50 ms and more with
10,000 studios. pg_trgm's GIN indexes on those two expressions answer a word of three
characters or more from the index; shorter words, and words most studios match, are
still scanned (the planner's choice).

pg_trgm ships with Debian's postgresql and is a trusted extension (PostgreSQL 13 and
later: a database owner may create it). Where it cannot be created the search works as
before, without the indexes, and the log says so. SQLite: nothing (its LIKE scans the
list index, controller.studios_service).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02 06:15:00.000000
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from alembic import op
from sqlalchemy.exc import DBAPIError

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger(__name__)

_INDEXES = {
    "ix_studios_name_trgm": "lower(name)",
    "ix_studios_template_trgm": "lower(template_repository)",
}


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    try:
        # In a savepoint: a refusal (not installed, not allowed) leaves the migration's
        # transaction usable.
        with bind.begin_nested():
            bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except DBAPIError as exc:
        log.warning(
            "studio search without trigram indexes: cannot create the PostgreSQL extension "
            "pg_trgm (%s); free-text search reads every studio of the workspace",
            str(exc.orig).strip().splitlines()[0],
        )
        return
    for name, expression in _INDEXES.items():
        bind.exec_driver_sql(
            f"CREATE INDEX IF NOT EXISTS {name} ON studios USING gin ({expression} gin_trgm_ops)"
        )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for name in _INDEXES:
        bind.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
