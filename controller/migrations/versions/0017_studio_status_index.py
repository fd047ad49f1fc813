"""An index on the studios' status for the passes that look for a few of them.

The deadline pass (`starting`/`stopping` past their deadline), the lost-agent pass and
the reconciler each select the studios in some active status, every few seconds on the
leader. Without an index each pass read every studio row: 4-20 ms with 10,000 studios
on SQLite, on the event loop that also answers the API. Most studios are `stopped`, so
the active ones are a small, selective part of this index.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-02 06:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("studios") as batch:
        batch.create_index("ix_studios_status", ["status"])


def downgrade() -> None:
    with op.batch_alter_table("studios") as batch:
        batch.drop_index("ix_studios_status")
