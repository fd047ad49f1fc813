"""The list of studios answered from one index (issue 16: GET /studios under load).

`ix_studios_workspace_created` (workspace, created, id) gave the default order, but the
count of a page's total and a free-text search still read every studio row of the
workspace (wide rows: configuration, progress, volume as JSON): 22 ms for the count
alone with 10,000 studios on SQLite. `ix_studios_live_list` leads with what every list
filters on (workspace, deleted), keeps the order, and carries the columns the free-text
search reads (name, template), so the count, the page and a search scan only the index.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02 02:15:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ["workspace_id", "deleted", "date_created", "session_id", "name", "template_repository"]


def upgrade() -> None:
    with op.batch_alter_table("studios") as batch:
        batch.drop_index("ix_studios_workspace_created")
        batch.create_index("ix_studios_live_list", _COLUMNS)


def downgrade() -> None:
    with op.batch_alter_table("studios") as batch:
        batch.drop_index("ix_studios_live_list")
        batch.create_index(
            "ix_studios_workspace_created", ["workspace_id", "date_created", "session_id"]
        )
