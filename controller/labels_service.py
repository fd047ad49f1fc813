"""Labels of a workspace (Seqera's `/labels`) and the labels of studios.

A label is simple (a name) or a resource label (`name=value`, `resource: true`). Names
follow the reference's name pattern (2 to 39 letters, digits, `-` or `_`, starting and
ending with a letter or digit, no two separators in a row); values the same alphabet plus
`.` (versions) and 1 to 39 characters. A (name, value) pair is unique in a workspace.

- `POST /labels` creates a label or, as the reference says, answers the existing label of
  the same name and value (200 either way). `PUT /labels/{id}` onto another label's name
  and value is 409 naming `name`.
- Deleting a label takes it off every studio that has it.
- Studios take resource labels only (studio-roles.md: "edit studio resource labels"):
  `labelIds` at create, start and edit; a create without `labelIds` gets the workspace's
  default resource labels (`isDefault`).
- `GET /studios?search=label:name=value` (or `label:name`: any value) finds studios by label.

Roles: any participant lists labels; maintain and above create, edit and delete them and
change a studio's labels. Another workspace's label is 404.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from controller.auth import Permission, Principal, require, workspace_role, workspace_role_or_404
from controller.db import Database, escape_like
from controller.errors import BadRequest, Conflict, NotFound
from controller.models import Label, StudioLabel, utcnow

__all__ = [
    "LABEL_TYPES",
    "LabelPage",
    "LabelService",
    "check_label_name",
    "check_label_value",
    "label_search_clause",
    "labels_by_studio",
    "set_studio_labels",
    "studio_labels_for",
]

DEFAULT_WORKSPACE_ID = 1
DEFAULT_PAGE_SIZE = 100
LABEL_TYPES = ("simple", "resource", "all")
# The reference's name pattern (organisation, workspace and team names).
_NAME = re.compile(r"^[a-zA-Z\d](?:[a-zA-Z\d]|[-_](?=[a-zA-Z\d])){1,38}$")
_VALUE = re.compile(r"^[a-zA-Z\d](?:[a-zA-Z\d]|[-_.](?=[a-zA-Z\d])){0,38}$")


@dataclass(frozen=True, slots=True)
class LabelPage:
    max: int | None
    offset: int


def check_label_name(name: str | None, field: str = "name") -> str:
    if name is None or not _NAME.match(name):
        raise BadRequest(
            f"{field}: a label name has 2 to 39 letters, digits, '-' or '_', starts and ends "
            f"with a letter or digit and has no two separators in a row, got {name!r}"
        )
    return name


def check_label_value(value: str | None, field: str = "value") -> str:
    if value is None or not _VALUE.match(value):
        raise BadRequest(
            f"{field}: a resource label's value has 1 to 39 letters, digits, '-', '_' or '.', "
            f"starts and ends with a letter or digit, got {value!r}"
        )
    return value


def _text(label: Label) -> str:
    return f"{label.name}={label.value}" if label.resource else label.name


async def _label(
    session: AsyncSession,
    principal: Principal,
    label_id: int,
    workspace_id: int | None,
    permission: Permission,
) -> Label:
    """A label the caller may use: 404 for another workspace's or an unknown one."""
    label = await session.get(Label, label_id)
    missing = NotFound(f"label {label_id} not found")
    if label is None or (workspace_id is not None and label.workspace_id != workspace_id):
        raise missing
    role = await workspace_role(session, principal.user_id, label.workspace_id)
    if role is None:
        raise missing
    require(role, permission)
    return label


async def _taken(
    session: AsyncSession, workspace_id: int, name: str, value: str, exclude: int | None = None
) -> Label | None:
    query = select(Label).where(
        Label.workspace_id == workspace_id, Label.name == name, Label.value == value
    )
    if exclude is not None:
        query = query.where(Label.id != exclude)
    return (await session.scalars(query)).first()


class LabelService:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def list(
        self,
        principal: Principal,
        workspace_id: int | None,
        *,
        search: str | None,
        label_type: str | None,
        is_default: bool | None,
        page: LabelPage,
    ) -> tuple[list[Label], int]:
        """Labels by name and value; `search` is a case-insensitive substring of the name
        (or of `name=value`)."""
        workspace_id = workspace_id or DEFAULT_WORKSPACE_ID
        kind = label_type or "all"
        if kind not in LABEL_TYPES:
            raise BadRequest(f"type: must be one of {', '.join(LABEL_TYPES)}, got {kind!r}")
        async with self.db.transaction() as session:
            role = await workspace_role_or_404(session, principal.user_id, workspace_id)
            require(role, Permission.READ)
            query = select(Label).where(Label.workspace_id == workspace_id)
            if kind != "all":
                query = query.where(Label.resource.is_(kind == "resource"))
            if is_default is not None:
                query = query.where(Label.is_default.is_(is_default))
            if search:
                pattern = f"%{escape_like(search.lower())}%"
                query = query.where(
                    or_(
                        func.lower(Label.name).like(pattern, escape="\\"),
                        func.lower(Label.name + "=" + Label.value).like(pattern, escape="\\"),
                    )
                )
            total = await session.scalar(
                select(func.count()).select_from(query.with_only_columns(Label.id).subquery())
            )
            rows = (
                await session.scalars(
                    query.order_by(Label.name, Label.value, Label.id)
                    .offset(page.offset)
                    .limit(page.max if page.max is not None else DEFAULT_PAGE_SIZE)
                )
            ).all()
            return list(rows), int(total or 0)

    async def create(
        self,
        principal: Principal,
        workspace_id: int | None,
        *,
        name: str | None,
        value: str | None,
        resource: bool,
        is_default: bool,
    ) -> Label:
        """A new label, or the existing one of the same name and value (the reference's
        create-or-get)."""
        workspace_id = workspace_id or DEFAULT_WORKSPACE_ID
        check_label_name(name)
        assert name is not None
        if resource:
            check_label_value(value)
        elif value:
            raise BadRequest("value: only resource labels have a value (set resource: true)")
        stored_value = value if resource and value else ""
        for _attempt in range(2):
            try:
                async with self.db.transaction() as session:
                    role = await workspace_role_or_404(session, principal.user_id, workspace_id)
                    require(role, Permission.LABELS)
                    existing = await _taken(session, workspace_id, name, stored_value)
                    if existing is not None:
                        return existing
                    label = Label(
                        workspace_id=workspace_id,
                        name=name,
                        value=stored_value,
                        resource=resource,
                        is_default=is_default,
                        date_created=utcnow(),
                    )
                    session.add(label)
                    await session.flush()
                    return label
            except IntegrityError:
                # A concurrent create of the same label won: answer that one.
                continue
        raise Conflict(f"name: a label {name!r} is being created concurrently; try again")

    async def update(
        self,
        principal: Principal,
        label_id: int,
        workspace_id: int | None,
        *,
        name: str | None,
        value: str | None,
        is_default: bool | None,
    ) -> Label:
        """Rename, change the value (resource labels only) or the default flag."""
        if name is not None:
            check_label_name(name)
        try:
            async with self.db.transaction() as session:
                label = await _label(session, principal, label_id, workspace_id, Permission.LABELS)
                if value is not None:
                    if not label.resource:
                        raise BadRequest("value: only resource labels have a value")
                    check_label_value(value)
                new_name = name if name is not None else label.name
                new_value = value if value is not None else label.value
                if (new_name, new_value) != (label.name, label.value) and await _taken(
                    session, label.workspace_id, new_name, new_value, exclude=label.id
                ):
                    raise Conflict(f"name: a label {new_name}={new_value} already exists")
                label.name, label.value = new_name, new_value
                if is_default is not None:
                    label.is_default = is_default
                await session.flush()
                return label
        except IntegrityError:
            raise Conflict(f"name: a label {name!r} already exists") from None

    async def delete(self, principal: Principal, label_id: int, workspace_id: int | None) -> None:
        """Delete a label and take it off every studio that has it."""
        async with self.db.transaction() as session:
            label = await _label(session, principal, label_id, workspace_id, Permission.LABELS)
            await session.execute(delete(StudioLabel).where(StudioLabel.label_id == label.id))
            await session.delete(label)


async def studio_labels_for(
    session: AsyncSession, workspace_id: int, label_ids: Sequence[int] | None
) -> list[Label]:
    """The labels `labelIds` names for a studio of the workspace; None: the workspace's
    default resource labels. Unknown, another workspace's and simple labels are refused."""
    if label_ids is None:
        rows = await session.scalars(
            select(Label)
            .where(
                Label.workspace_id == workspace_id,
                Label.resource.is_(True),
                Label.is_default.is_(True),
            )
            .order_by(Label.id)
        )
        return list(rows.all())
    wanted = list(dict.fromkeys(label_ids))
    found = {
        label.id: label
        for label in (
            await session.scalars(
                select(Label).where(Label.id.in_(wanted), Label.workspace_id == workspace_id)
            )
        ).all()
    }
    for label_id in wanted:
        label = found.get(label_id)
        if label is None:
            raise NotFound(f"labelIds: label {label_id} not found")
        if not label.resource:
            raise BadRequest(
                f"labelIds: label {label_id} ({label.name}) is not a resource label; "
                "studios take resource labels (name=value)"
            )
    # Two values of one name on a studio would make `name` ambiguous.
    names: dict[str, Label] = {}
    for label_id in wanted:
        label = found[label_id]
        other = names.setdefault(label.name, label)
        if other is not label:
            raise BadRequest(
                f"labelIds: {_text(other)} and {_text(label)} have the same name; "
                "a studio has one value per label name"
            )
    return [found[i] for i in wanted]


async def set_studio_labels(
    session: AsyncSession, session_id: str, labels: Sequence[Label]
) -> None:
    """The studio's labels become exactly `labels`."""
    await session.execute(delete(StudioLabel).where(StudioLabel.session_id == session_id))
    for label in labels:
        session.add(StudioLabel(session_id=session_id, label_id=label.id))
    await session.flush()


async def labels_by_studio(
    session: AsyncSession, session_ids: Sequence[str]
) -> dict[str, list[Label]]:
    """The labels of each studio, by name and value."""
    if not session_ids:
        return {}
    rows = await session.execute(
        select(StudioLabel.session_id, Label)
        .join(Label, Label.id == StudioLabel.label_id)
        .where(StudioLabel.session_id.in_(list(session_ids)))
        .order_by(Label.name, Label.value)
    )
    out: dict[str, list[Label]] = {}
    for session_id, label in rows.all():
        out.setdefault(session_id, []).append(label)
    return out


def label_search_clause(session_id_column: Any, values: Sequence[str]) -> Any:
    """Studios having any of the labels `values` (`name=value`, or `name`: any value)."""
    matches = []
    for text in values:
        name, sep, value = text.partition("=")
        condition = Label.name == name
        if sep:
            condition = and_(condition, Label.value == value)
        matches.append(condition)
    having = (
        select(StudioLabel.session_id)
        .join(Label, Label.id == StudioLabel.label_id)
        .where(or_(*matches))
    )
    return session_id_column.in_(having)
