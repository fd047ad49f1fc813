"""What the REST API does with studios: create (and add as new), list and
search, describe, update, start, stop, delete, lifespans, checkpoints,
compatible compute environments, mounted data-links and connect. Web handlers
parse and answer; this module decides.

Workspace scoping: `workspaceId` omitted means the default workspace (1) for
create, list and validate; for a single studio it means "the studio's own
workspace". A user without a role in the studio's workspace gets 404, as if
the studio did not exist. Roles and private studios: `controller.auth`.

Search (`GET /studios?search=`): whitespace-separated terms, all of which
must match. `status:S`, `computeEnvId:ID`, `userId:ID-or-user-name` and
`label:name=value` (or `label:name`, any value) are keywords (several values of
one keyword: any of them); anything else is free
text matched, case-insensitively, as a substring of the name or the template
repository. A double-quoted `"two words"` is one term (also as a keyword's
value). Checkpoint search: free text on the name, `status:`, `before:` and
`after:` (ISO 8601 dates or times of `dateSaved`, UTC when no zone is given).

Add as new (`initialCheckpointId`): any restorable checkpoint of a live studio
of the same workspace, except the one a running session is writing (409).
The clone inherits the template, compute environment, `condaEnvironment` and
`lifespanHours`; they cannot change later (400), except that the template
may move to a newer version of the same tool. Its first start restores the
parent checkpoint (later starts restore its own newest checkpoint).

Private studios beyond the roles (docs/contract-notes.md, "Authorization rules
beyond roles"): only the creator widens `allowedUserIds` (at start; edits carry
no such field); cloning a private studio's checkpoint needs the right to
connect to it, and the clone is private to the cloning user (open at most to
those who could connect to the parent) unless the parent's creator clones it.

Compatible compute environments: those of the same workspace with the same
platform and work directory (so the studio's checkpoints stay reachable).

The connection audit (`connections`, an addition): a studio's visits newest first,
to workspace admins and owners only (403 below), also once the studio is deleted.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import LargeBinary, Select, bindparam, case, cast, false, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased, load_only

from controller import lifecycle
from controller.agent_hub import AgentHub
from controller.auth import (
    Permission,
    Principal,
    Role,
    check_studio_access,
    require,
    studio_access_denial,
    workspace_role,
    workspace_role_or_404,
)
from controller.db import Database, escape_like
from controller.errors import BadRequest, Conflict, Forbidden, NotFound
from controller.fault_injection import pause_for_test
from controller.labels_service import (
    label_search_clause,
    labels_by_studio,
    set_studio_labels,
    studio_labels_for,
)
from controller.lifecycle import Status
from controller.lifespan import base_lifespan_hours
from controller.models import (
    Agent,
    Checkpoint,
    ComputeEnv,
    Label,
    Studio,
    StudioBuild,
    StudioConnection,
    User,
    Workspace,
    utcnow,
)
from controller.models import StudioRun as StudioRunRow
from controller.mounts import StudioMount, check_mount_data, studio_mounts
from controller.placement import PLACING_STEP, Placer
from controller.requests import (
    DataStudioConfiguration,
    DataStudioCreateRequest,
    DataStudioStartRequest,
    DataStudioUpdateRequest,
)
from controller.studio_events import events_for
from controller.templates import Catalogue, ResolvedTemplate, Template, default_catalogue
from studios_shared.connect_token import (
    CONNECT_TOKEN_MAX_SECONDS,
    derive_agent_key,
    sign_connect_token,
)

__all__ = [
    "DEFAULT_WORKSPACE_ID",
    "CheckpointRow",
    "CompatibleEnvs",
    "Page",
    "StudioDetails",
    "StudioRun",
    "StudioService",
    "parse_search",
]

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_ID = 1
DEFAULT_PAGE_SIZE = 50
_SESSION_ID = re.compile(r"^[0-9a-f]{8}$")
_SEARCH_KEYWORDS = {
    "status": "status",
    "userid": "userId",
    "computeenvid": "computeEnvId",
    "label": "label",
}
_CHECKPOINT_KEYWORDS = {"status": "status", "before": "before", "after": "after"}
_TERM = re.compile(r'(?:([A-Za-z]+):)?(?:"([^"]*)"|(\S+))')
_RESTORABLE = ("finalized", "interim")
# Configuration a clone inherits and cannot change.
_INHERITED = ("condaEnvironment", "lifespanHours")


@dataclass(frozen=True, slots=True)
class Page:
    max: int | None
    offset: int


@dataclass(frozen=True, slots=True)
class StudioDetails:
    """A studio and the rows its API view refers to (None: since deleted)."""

    studio: Studio
    owner: User | None
    compute_env: ComputeEnv | None
    workspace: Workspace | None
    allowed_users: list[User]
    # The checkpoint a studio added as new started from, and that checkpoint's studio.
    parent: tuple[Checkpoint, Studio] | None
    mounts: list[StudioMount]
    # Its labels by name and value (controller.labels_service).
    labels: list[Label] = field(default_factory=list)
    # Its template's catalogue entry (None: a custom image, or no longer listed), and the
    # warning a session of a deprecated or experimental template shows in its status
    # message: computed when shown, so agents' reports never overwrite it.
    template: Template | None = None
    template_warning: str | None = None


@dataclass(frozen=True, slots=True)
class StudioRun:
    """The outcome of a start or stop: whether a job was submitted, and the studio after it."""

    submitted: bool
    studio: Studio
    # What the start's statusInfo warns of (a deprecated or experimental template).
    template_warning: str | None = None


@dataclass(frozen=True, slots=True)
class CheckpointRow:
    checkpoint: Checkpoint
    # None when the author is unknown or since deleted.
    author: User | None


@dataclass(frozen=True, slots=True)
class CompatibleEnvs:
    workspace_name: str
    envs: list[ComputeEnv]


def parse_search(
    text: str | None, keywords: dict[str, str]
) -> tuple[list[str], dict[str, list[str]]]:
    """(free-text terms, {keyword: values}) of a search string; never fails."""
    words: list[str] = []
    found: dict[str, list[str]] = {}
    # NUL is not storable in PostgreSQL text and truncates SQLite patterns.
    for match in _TERM.finditer((text or "").replace("\x00", "")):
        key, quoted, bare = match.groups()
        value = quoted if quoted is not None else bare
        if key is not None and key.lower() in keywords:
            found.setdefault(keywords[key.lower()], []).append(value)
        elif key is not None:
            words.append(f"{key}:{value}")
        elif value:
            words.append(value)
    return words, found


def _like(column: Any, word: str) -> Any:
    return func.lower(column).like(f"%{escape_like(word.lower())}%", escape="\\")


def _parse_time(keyword: str, value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"search: {keyword}: expects an ISO 8601 date or time, got {value!r}"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _checkpoint_name(name: str) -> str:
    cleaned = re.sub(r"\s", "_", name.strip())
    if not cleaned:
        raise BadRequest("name: must not be blank")
    return cleaned


class StudioService:
    def __init__(
        self,
        db: Database,
        hub: AgentHub,
        placer: Placer,
        master_key: bytes,
        *,
        public_url: str,
        connect_token_ttl: float,
        catalogue: Catalogue | None = None,
    ) -> None:
        self.db = db
        self.hub = hub
        self.placer = placer
        self.master_key = master_key
        self.public_url = public_url
        self.connect_token_ttl = connect_token_ttl
        # The template catalogue (controller.templates): statuses, start refusals and warnings.
        self.catalogue = catalogue if catalogue is not None else default_catalogue()
        # Committed status changes, for the long-poll of `get(..., wait=...)`.
        self.events = events_for(db.engine.sync_engine)

    # ------------------------------------------------------------ helpers

    async def _role(self, session: AsyncSession, principal: Principal, workspace_id: int) -> Role:
        return await workspace_role_or_404(session, principal.user_id, workspace_id)

    async def _studio(
        self,
        session: AsyncSession,
        principal: Principal,
        session_id: str,
        workspace_id: int | None,
        *,
        for_update: bool = False,
    ) -> tuple[Studio, Role]:
        missing = NotFound(f"studio {session_id} not found")
        if not _SESSION_ID.match(session_id):
            raise missing
        studio = await session.get(Studio, session_id, with_for_update=for_update or None)
        if studio is None or studio.deleted:
            raise missing
        if workspace_id is not None and studio.workspace_id != workspace_id:
            raise missing
        role = await workspace_role(session, principal.user_id, studio.workspace_id)
        if role is None:
            raise missing
        return studio, role

    async def _details(self, session: AsyncSession, studio: Studio) -> StudioDetails:
        return (await self._details_of(session, [studio]))[0]

    async def _details_of(
        self, session: AsyncSession, studios: Sequence[Studio]
    ) -> list[StudioDetails]:
        """`studios` with what they refer to, loaded in a few queries."""
        if not studios:
            return []
        parent_ids = {s.parent_checkpoint_id for s in studios if s.parent_checkpoint_id}
        parents: dict[int, tuple[Checkpoint, Studio]] = {}
        if parent_ids:
            rows = await session.execute(
                select(Checkpoint, Studio)
                .join(Studio, Studio.session_id == Checkpoint.session_id)
                .where(Checkpoint.id.in_(parent_ids))
            )
            parents = {c.id: (c, st) for c, st in rows.all()}
        user_ids = {s.user_id for s in studios}
        for s in studios:
            user_ids.update(s.allowed_user_ids or [])
        users = await _by_id(session, User, User.id, user_ids)
        envs = await _by_id(session, ComputeEnv, ComputeEnv.id, {s.compute_env_id for s in studios})
        workspaces = await _by_id(
            session, Workspace, Workspace.id, {s.workspace_id for s in studios}
        )
        mounts = await studio_mounts(session, studios, envs)
        labels = await labels_by_studio(session, [s.session_id for s in studios])
        return [
            StudioDetails(
                studio=s,
                owner=users.get(s.user_id),
                compute_env=envs.get(s.compute_env_id),
                workspace=workspaces.get(s.workspace_id),
                allowed_users=[users[u] for u in (s.allowed_user_ids or []) if u in users],
                parent=parents.get(s.parent_checkpoint_id or -1),
                mounts=mounts.get(s.session_id, []),
                labels=labels.get(s.session_id, []),
                template=self.catalogue.get(s.template_repository),
                template_warning=self.catalogue.start_warning(s.template_repository),
            )
            for s in studios
        ]

    async def _new_session_id(self, session: AsyncSession) -> str:
        while True:
            candidate = secrets.token_hex(4)
            if await session.get(Studio, candidate) is None:
                return candidate

    @staticmethod
    async def _name_taken(
        session: AsyncSession, workspace_id: int, name: str, exclude: str | None = None
    ) -> bool:
        query = select(Studio.session_id).where(
            Studio.workspace_id == workspace_id, Studio.name == name, Studio.deleted.is_(False)
        )
        if exclude:
            query = query.where(Studio.session_id != exclude)
        return (await session.scalar(query)) is not None

    @staticmethod
    async def _check_allowed_users(
        session: AsyncSession, workspace_id: int, user_ids: list[int]
    ) -> list[int]:
        """The distinct ids; BadRequest unless each is a user with a role in the workspace."""
        wanted = list(dict.fromkeys(user_ids))
        for user_id in wanted:
            if await session.get(User, user_id) is None or (
                await workspace_role(session, user_id, workspace_id) is None
            ):
                raise BadRequest(
                    f"allowedUserIds: user {user_id} is not a participant of workspace "
                    f"{workspace_id}"
                )
        return wanted

    @staticmethod
    def _check_inherited(studio: Studio, configuration: DataStudioConfiguration) -> None:
        """A clone's condaEnvironment and lifespanHours cannot change (absent: kept)."""
        given = configuration.stored()
        current = studio.configuration or {}
        for key in _INHERITED:
            if key in given and given[key] != current.get(key):
                raise BadRequest(
                    f"configuration.{key}: a studio added as new keeps its parent's {key}"
                )

    @staticmethod
    def _merge_inherited(studio: Studio, configuration: DataStudioConfiguration) -> dict[str, Any]:
        stored = configuration.stored()
        for key in _INHERITED:
            if key in (studio.configuration or {}):
                stored[key] = studio.configuration[key]
        return stored

    @staticmethod
    def _check_widening(studio: Studio, principal: Principal, wanted: list[int]) -> None:
        """Forbidden unless the caller is the private studio's creator or adds nobody.

        Admins and owners may start a private studio they cannot connect to; naming
        themselves (or anyone else new) in its allowedUserIds would let them in.
        Keeping or narrowing the list is anyone's who may start it."""
        if not studio.is_private or principal.user_id == studio.user_id:
            return
        added = sorted(set(wanted) - set(studio.allowed_user_ids or []))
        if added:
            raise Forbidden(
                f"allowedUserIds: studio {studio.session_id} is private: only its creator may "
                f"widen who can connect to it (would add {', '.join(map(str, added))})"
            )

    @staticmethod
    def _clone_privacy(
        parent: Studio, principal: Principal, is_private: bool | None, allowed: list[int]
    ) -> bool | None:
        """The privacy of a clone of `parent` (None: the workspace default).

        A clone of a private studio is private to the user who clones it, unless its
        creator does: not public, and open to nobody who could not connect to the
        parent (its creator and allowed users may be named)."""
        if not parent.is_private or principal.user_id == parent.user_id:
            return is_private
        if is_private is False:
            raise Forbidden(
                f"isPrivate: studio {parent.session_id} is private: a clone of it is private "
                "to the user who clones it unless its creator clones it"
            )
        could_connect = {parent.user_id, *(parent.allowed_user_ids or [])}
        outside = sorted(set(allowed) - could_connect)
        if outside:
            raise Forbidden(
                f"allowedUserIds: studio {parent.session_id} is private: a clone of it may be "
                f"open only to users who can connect to it (not {', '.join(map(str, outside))})"
            )
        return True

    async def _restore_point(self, session: AsyncSession, studio: Studio) -> int | None:
        """The studio's newest restorable checkpoint, else (a clone) its parent checkpoint."""
        own = await session.scalar(
            select(Checkpoint.id)
            .where(
                Checkpoint.session_id == studio.session_id,
                Checkpoint.status.in_(_RESTORABLE),
                # A run recovered from a lost agent is restored only when chosen by name.
                Checkpoint.recovered_from_agent.is_(None),
            )
            .order_by(Checkpoint.date_saved.desc(), Checkpoint.id.desc())
            .limit(1)
        )
        return own if own is not None else studio.parent_checkpoint_id

    async def _clone_source(
        self,
        session: AsyncSession,
        principal: Principal,
        role: Role,
        workspace_id: int,
        checkpoint_id: int,
    ) -> tuple[Checkpoint, Studio]:
        missing = NotFound(f"checkpoint {checkpoint_id} not found")
        checkpoint = await session.get(Checkpoint, checkpoint_id)
        if checkpoint is None:
            raise missing
        parent = await session.get(Studio, checkpoint.session_id)
        if parent is None or parent.deleted or parent.workspace_id != workspace_id:
            raise missing
        check_studio_access(parent, role, principal, Permission.CLONE)
        if parent.is_private:
            # A clone holds the private studio's data: who may not connect to it may
            # not copy it either (admins and owners included).
            why = studio_access_denial(parent, role, principal.user_id, Permission.CONNECT)
            if why is not None:
                raise Forbidden(
                    f"initialCheckpointId: cloning a checkpoint of a private studio needs "
                    f"the right to connect to it ({why})"
                )
        if checkpoint.status not in _RESTORABLE:
            raise BadRequest(
                f"initialCheckpointId: checkpoint {checkpoint_id} is {checkpoint.status}: "
                "only a finalized or interim checkpoint can be restored"
            )
        if lifecycle.is_writing(parent, checkpoint):
            raise Conflict(
                f"checkpoint {checkpoint_id} is being written by the {parent.status} session of "
                f"studio {parent.session_id}: choose an earlier checkpoint or stop the studio"
            )
        return checkpoint, parent

    # ------------------------------------------------------------ operations

    async def create(
        self,
        principal: Principal,
        workspace_id: int | None,
        body: DataStudioCreateRequest,
        *,
        auto_start: bool,
    ) -> StudioDetails:
        workspace_id = workspace_id or DEFAULT_WORKSPACE_ID
        try:
            async with self.db.transaction() as session:
                role = await self._role(session, principal, workspace_id)
                require(role, Permission.WRITE)
                if auto_start:
                    require(role, Permission.EXECUTE)
                configuration = body.configuration or DataStudioConfiguration()
                stored = configuration.stored()
                parent: tuple[Checkpoint, Studio] | None = None
                if body.initial_checkpoint_id is not None:
                    require(role, Permission.CLONE)
                    parent = await self._clone_source(
                        session, principal, role, workspace_id, body.initial_checkpoint_id
                    )
                    template = self._clone_template(parent[1], body.data_studio_tool_url)
                    if body.compute_env_id != parent[1].compute_env_id:
                        raise BadRequest(
                            "computeEnvId: a studio added as new keeps its parent's compute "
                            f"environment ({parent[1].compute_env_id})"
                        )
                    self._check_inherited(parent[1], configuration)
                    stored = self._merge_inherited(parent[1], configuration)
                else:
                    template = self.catalogue.resolve(body.data_studio_tool_url)
                env = await session.get(ComputeEnv, body.compute_env_id)
                if env is None or env.workspace_id != workspace_id or env.deleted:
                    raise NotFound(f"compute environment {body.compute_env_id} not found")
                if auto_start:
                    _check_enabled(env)
                    self._check_template(template.repository)
                if body.label_ids:
                    require(role, Permission.LABELS)
                labels = await studio_labels_for(session, workspace_id, body.label_ids)
                await check_mount_data(session, workspace_id, body.configuration)
                if await self._name_taken(session, workspace_id, body.name):
                    raise Conflict(f"a studio named {body.name!r} already exists in the workspace")
                allowed = await self._check_allowed_users(
                    session, workspace_id, body.allowed_user_ids or []
                )
                is_private = body.is_private
                if parent is not None:
                    is_private = self._clone_privacy(parent[1], principal, is_private, allowed)
                workspace = await session.get(Workspace, workspace_id)
                now = utcnow()
                studio = Studio(
                    session_id=await self._new_session_id(session),
                    workspace_id=workspace_id,
                    user_id=principal.user_id,
                    name=body.name,
                    description=body.description,
                    template_repository=template.repository,
                    tool=template.tool,
                    custom_image=template.custom,
                    compute_env_id=env.id,
                    configuration=stored,
                    is_private=(
                        is_private
                        if is_private is not None
                        else bool(workspace and workspace.private_studio_by_default)
                    ),
                    allowed_user_ids=allowed,
                    parent_checkpoint_id=parent[0].id if parent else None,
                    lifespan_extra_hours=0,
                    status=Status.STOPPED.value,
                    desired_status="stopped",
                    generation=0,
                    progress=[],
                    volume={},
                    date_created=now,
                    last_updated=now,
                    status_updated_at=now,
                )
                session.add(studio)
                await set_studio_labels(session, studio.session_id, labels)
                if auto_start:
                    self._start(studio, principal)
                    studio.restore_checkpoint_id = studio.parent_checkpoint_id
                session_id = studio.session_id
        except IntegrityError:
            # Lost a race with a concurrent create of the same name.
            raise Conflict(
                f"a studio named {body.name!r} already exists in the workspace"
            ) from None
        log.info("studio %s (%r) created by %s", session_id, body.name, principal.user_name)
        await pause_for_test("create.committed")
        if auto_start:
            await self.placer.place_pending([session_id])
            await pause_for_test("create.placed")
        async with self.db.transaction() as session:
            created = await session.get(Studio, session_id)
            assert created is not None
            return await self._details(session, created)

    def _clone_template(self, parent: Studio, tool_url: str | None) -> ResolvedTemplate:
        """The template of a studio added as new: its parent's, or a newer version of the
        same tool (a migration, DESIGN.md "Session lifecycle"); never an older one, whose
        tool might not read what a newer one wrote."""
        inherited = ResolvedTemplate(
            parent.template_repository, parent.tool, None, None, custom=parent.custom_image
        )
        if tool_url is None or not tool_url.strip() or tool_url.strip() == inherited.repository:
            return inherited
        wanted = self.catalogue.resolve(tool_url)
        if not self.catalogue.migration_target(parent.template_repository, wanted):
            raise BadRequest(
                "dataStudioToolUrl: a studio added as new keeps its parent's template "
                f"({parent.template_repository}) or moves to a newer version of the same tool"
                f"; {wanted.repository} is not one"
            )
        return wanted

    def _check_template(self, repository: str) -> None:
        """No session starts on an unsupported template (409 with the reason)."""
        refusal = self.catalogue.start_refusal(repository)
        if refusal is not None:
            raise Conflict(refusal)

    def _start(self, studio: Studio, principal: Principal) -> None:
        """Record a start (the caller places it once committed)."""
        now = utcnow()
        studio.generation += 1
        studio.desired_status = "running"
        studio.agent_id = None
        studio.placed_at = None
        studio.started_by_user_id = principal.user_id
        studio.last_started = now
        studio.lifespan_extra_hours = 0
        studio.tool_port = None
        studio.root_dir = None
        studio.progress = [{"message": PLACING_STEP, "status": "in-progress", "warnings": []}]
        lifecycle.transition(studio, Status.STARTING, message=PLACING_STEP, now=now)

    async def get(
        self,
        principal: Principal,
        session_id: str,
        workspace_id: int | None,
        *,
        wait_for: frozenset[Status] = frozenset(),
        wait_seconds: float = 0.0,
    ) -> StudioDetails:
        """The studio; with `wait_for`, once it is in one of those statuses or
        `wait_seconds` have passed (whichever is first), as it is then."""
        if not wait_for or wait_seconds <= 0:
            return await self._get_once(principal, session_id, workspace_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        # Subscribed before the first read: a change committed between the read and the
        # wait still wakes it.
        with self.events.subscribe(session_id) as changes:
            while True:
                details = await self._get_once(principal, session_id, workspace_id)
                if Status(details.studio.status) in wait_for:
                    return details
                left = deadline - loop.time()
                if left <= 0:
                    return details
                try:
                    async with asyncio.timeout(left):
                        await changes.wait()
                except TimeoutError:
                    pass

    async def _get_once(
        self, principal: Principal, session_id: str, workspace_id: int | None
    ) -> StudioDetails:
        async with self.db.read() as session:
            studio, _role = await self._studio(session, principal, session_id, workspace_id)
            return await self._details(session, studio)

    async def list(
        self,
        principal: Principal,
        workspace_id: int | None,
        search: str | None,
        page: Page,
        *,
        with_labels: bool = True,
    ) -> tuple[list[StudioDetails], int]:
        """A page of the workspace's studios, newest first, and how many match.

        Issue 16 (GET /studios under load): one statement answers the count, the page and
        the rows each studio's view refers to (owner, compute environment, workspace,
        parent checkpoint), where `_details_of` takes eight round trips; each costs about
        a millisecond of CPU through aiosqlite's thread. Allowed users, labels (only when
        asked for) and data-links (only for studios that mount some) follow in one
        batched statement each when there are any."""
        workspace_id = workspace_id or DEFAULT_WORKSPACE_ID
        async with self.db.read() as session:
            await self._role(session, principal, workspace_id)
            params = {
                "workspace_id": workspace_id,
                "offset": page.offset,
                "size": page.max if page.max is not None else DEFAULT_PAGE_SIZE,
            }
            query = _studio_search(_LIVE_STUDIOS, search, native_ascii_like=self.db.is_sqlite)
            # Without a search (the default page, any page) the statement is always the
            # same: built once, its SQL found in SQLAlchemy's cache without building a
            # cache key (a millisecond a request) again.
            statement = _PLAIN_LIST if query is _LIVE_STUDIOS else _list_statement(query)
            rows = (await session.execute(statement, params)).all()
            if rows:
                total = int(rows[0].total)
            else:
                # An empty page (past the end, or max=0) carries no count.
                counted = select(func.count()).select_from(query.subquery())
                total = int(await session.scalar(counted, params) or 0)
            details = await self._list_details(session, rows, with_labels=with_labels)
            return details, total

    async def _list_details(
        self, session: AsyncSession, rows: Sequence[Any], *, with_labels: bool
    ) -> builtins.list[StudioDetails]:
        """The `_list_statement` rows as StudioDetails (as `_details_of` gives them)."""
        studios: builtins.list[Studio] = [r.Studio for r in rows]
        users: dict[int, User] = {r.User.id: r.User for r in rows if r.User is not None}
        missing = {u for s in studios for u in s.allowed_user_ids or () if u not in users}
        if missing:
            users.update(await _by_id(session, User, User.id, missing))
        envs = {r.ComputeEnv.id: r.ComputeEnv for r in rows if r.ComputeEnv is not None}
        mounts = await studio_mounts(session, studios, envs)
        labels = (
            await labels_by_studio(session, [s.session_id for s in studios]) if with_labels else {}
        )
        return [
            StudioDetails(
                studio=s,
                owner=r.User,
                compute_env=r.ComputeEnv,
                workspace=r.Workspace,
                allowed_users=[users[u] for u in (s.allowed_user_ids or []) if u in users],
                parent=(r.Checkpoint, r.parent) if r.Checkpoint is not None else None,
                mounts=mounts.get(s.session_id, []),
                labels=labels.get(s.session_id, []),
                template=self.catalogue.get(s.template_repository),
                template_warning=self.catalogue.start_warning(s.template_repository),
            )
            for s, r in zip(studios, rows, strict=True)
        ]

    async def validate_name(
        self, principal: Principal, workspace_id: int | None, name: str | None
    ) -> None:
        workspace_id = workspace_id or DEFAULT_WORKSPACE_ID
        if name is None or not 1 <= len(name) <= 80:
            raise BadRequest("name: a studio name has 1 to 80 characters")
        async with self.db.transaction() as session:
            await self._role(session, principal, workspace_id)
            if await self._name_taken(session, workspace_id, name):
                raise Conflict(f"a studio named {name!r} already exists in the workspace")

    async def update(
        self,
        principal: Principal,
        session_id: str,
        workspace_id: int | None,
        body: DataStudioUpdateRequest,
    ) -> StudioDetails:
        try:
            async with self.db.transaction() as session:
                studio, role = await self._studio(
                    session, principal, session_id, workspace_id, for_update=True
                )
                check_studio_access(studio, role, principal, Permission.WRITE)
                lifecycle.check_update(studio)
                if body.name is not None and body.name != studio.name:
                    if await self._name_taken(
                        session, studio.workspace_id, body.name, exclude=studio.session_id
                    ):
                        raise Conflict(
                            f"a studio named {body.name!r} already exists in the workspace"
                        )
                    studio.name = body.name
                if body.description is not None:
                    studio.description = body.description
                if body.compute_env_id is not None and body.compute_env_id != studio.compute_env_id:
                    if studio.parent_checkpoint_id is not None:
                        raise BadRequest(
                            "computeEnvId: a studio added as new keeps its parent's compute "
                            "environment"
                        )
                    current = await session.get(ComputeEnv, studio.compute_env_id)
                    env = await session.get(ComputeEnv, body.compute_env_id)
                    if env is None or env.workspace_id != studio.workspace_id or env.deleted:
                        raise NotFound(f"compute environment {body.compute_env_id} not found")
                    if current is not None and not _compatible(current, env):
                        raise BadRequest(
                            f"computeEnvId: compute environment {env.id} is not compatible with "
                            f"{current.id} (see GET /studios/{session_id}/compatible-ce)"
                        )
                    studio.compute_env_id = env.id
                if body.label_ids is not None:
                    require(role, Permission.LABELS)
                    await set_studio_labels(
                        session,
                        studio.session_id,
                        await studio_labels_for(session, studio.workspace_id, body.label_ids),
                    )
                if body.configuration is not None:
                    await check_mount_data(session, studio.workspace_id, body.configuration)
                    if studio.parent_checkpoint_id is not None:
                        self._check_inherited(studio, body.configuration)
                        studio.configuration = self._merge_inherited(studio, body.configuration)
                    else:
                        studio.configuration = body.configuration.stored()
                studio.last_updated = utcnow()
                agent_id = studio.agent_id
        except IntegrityError:
            raise Conflict(
                f"a studio named {body.name!r} already exists in the workspace"
            ) from None
        # Edits are refused while a session is active, so its connect access
        # (controller.access) cannot narrow here today; re-sending is idempotent
        # and keeps that true if editable fields ever include privacy.
        self.hub.notify(agent_id, [session_id])
        async with self.db.transaction() as session:
            studio, _role = await self._studio(session, principal, session_id, None)
            return await self._details(session, studio)

    async def start(
        self,
        principal: Principal,
        session_id: str,
        workspace_id: int | None,
        body: DataStudioStartRequest | None,
    ) -> StudioRun:
        try:
            async with self.db.transaction() as session:
                studio, role = await self._studio(
                    session, principal, session_id, workspace_id, for_update=True
                )
                check_studio_access(studio, role, principal, Permission.EXECUTE)
                lifecycle.check_start(studio)
                env = await session.get(ComputeEnv, studio.compute_env_id)
                if env is not None:
                    _check_enabled(env)
                self._check_template(studio.template_repository)
                if body is not None:
                    if body.label_ids is not None:
                        require(role, Permission.LABELS)
                    await self._apply_start_overrides(session, studio, principal, body)
                previous_agent = studio.agent_id
                if previous_agent is not None and studio.status == Status.ERRORED.value:
                    # The errored run may still be on that agent (a lost agent): its final
                    # checkpoint, if it ever comes, is kept as a named one (observed.py).
                    await session.merge(
                        StudioRunRow(
                            session_id=studio.session_id,
                            generation=studio.generation,
                            agent_id=previous_agent,
                            left_at=utcnow(),
                        )
                    )
                self._start(studio, principal)
                studio.restore_checkpoint_id = await self._restore_point(session, studio)
        except IntegrityError:
            raise Conflict("a studio with that name already exists in the workspace") from None
        await pause_for_test("start.committed")
        # The agent of the previous run forgets it (it is placed anew).
        self.hub.notify(previous_agent, [session_id])
        await self.placer.place_pending([session_id])
        await pause_for_test("start.placed")
        async with self.db.transaction() as session:
            started = await session.get(Studio, session_id)
            assert started is not None
            return StudioRun(
                submitted=True,
                studio=started,
                template_warning=self.catalogue.start_warning(started.template_repository),
            )

    async def _apply_start_overrides(
        self,
        session: AsyncSession,
        studio: Studio,
        principal: Principal,
        body: DataStudioStartRequest,
    ) -> None:
        if body.name is not None and body.name != studio.name:
            if await self._name_taken(
                session, studio.workspace_id, body.name, exclude=studio.session_id
            ):
                raise Conflict(f"a studio named {body.name!r} already exists in the workspace")
            studio.name = body.name
        if body.description is not None:
            studio.description = body.description
        if body.configuration is not None:
            await check_mount_data(session, studio.workspace_id, body.configuration)
            if studio.parent_checkpoint_id is not None:
                self._check_inherited(studio, body.configuration)
                studio.configuration = self._merge_inherited(studio, body.configuration)
            else:
                studio.configuration = body.configuration.stored()
        if body.label_ids is not None:
            await set_studio_labels(
                session,
                studio.session_id,
                await studio_labels_for(session, studio.workspace_id, body.label_ids),
            )
        if body.allowed_user_ids is not None:
            wanted = await self._check_allowed_users(
                session, studio.workspace_id, body.allowed_user_ids
            )
            self._check_widening(studio, principal, wanted)
            studio.allowed_user_ids = wanted

    async def stop(
        self, principal: Principal, session_id: str, workspace_id: int | None
    ) -> StudioRun:
        async with self.db.transaction() as session:
            studio, role = await self._studio(
                session, principal, session_id, workspace_id, for_update=True
            )
            check_studio_access(studio, role, principal, Permission.EXECUTE)
            submitted = lifecycle.check_stop(studio)
            agent_id = studio.agent_id
            if submitted:
                studio.desired_status = "stopped"
                studio.progress = [
                    {"message": "stopping the session", "status": "in-progress", "warnings": []}
                ]
                lifecycle.transition(studio, Status.STOPPING, message="stopping")
            elif studio.desired_status == "running":
                # Errored or stopped while the agent was told to run: tell it
                # to stop, so nothing lingers there.
                studio.desired_status = "stopped"
        await pause_for_test("stop.committed")
        self.hub.notify(agent_id, [session_id])
        return StudioRun(submitted=submitted, studio=studio)

    async def cancel(
        self, principal: Principal, session_id: str, workspace_id: int | None
    ) -> StudioRun:
        """Cancel a start in progress (an addition; stop during `starting` stays 409).

        The agent abandons the start at its next safe point and releases what it made;
        the studio is `stopping` until it says `stopped`. A start no agent has reported
        anything of yet (not placed, or placed and not begun) is `stopped` at once: the
        agent, told so, has nothing to release and reports nothing.
        """
        async with self.db.transaction() as session:
            studio, role = await self._studio(
                session, principal, session_id, workspace_id, for_update=True
            )
            check_studio_access(studio, role, principal, Permission.EXECUTE)
            lifecycle.check_cancel(studio)
            agent_id = studio.agent_id
            studio.desired_status = "stopped"
            if agent_id is None or studio.root_dir is None:
                studio.progress = [
                    {"message": "start cancelled", "status": "succeeded", "warnings": []}
                ]
                lifecycle.transition(studio, Status.STOPPED, message="start cancelled")
            else:
                studio.progress = [
                    *(studio.progress or []),
                    {"message": "cancelling the start", "status": "in-progress", "warnings": []},
                ]
                lifecycle.transition(studio, Status.STOPPING, message="cancelling the start")
        log.info("studio %s: start cancelled by %s", session_id, principal.user_name)
        self.hub.notify(agent_id, [session_id])
        return StudioRun(submitted=True, studio=studio)

    async def delete(self, principal: Principal, session_id: str, workspace_id: int | None) -> None:
        async with self.db.transaction() as session:
            studio, role = await self._studio(
                session, principal, session_id, workspace_id, for_update=True
            )
            check_studio_access(studio, role, principal, Permission.WRITE)
            lifecycle.check_delete(studio)
            # Soft delete: the row keeps its checkpoints for garbage
            # collection, and the name is free again.
            studio.deleted = True
            studio.date_deleted = utcnow()
            studio.desired_status = "deleted"
            agent_id = studio.agent_id
        log.info("studio %s deleted by %s", session_id, principal.user_name)
        await pause_for_test("delete.committed")
        self.hub.notify(agent_id, [session_id])

    async def extend_lifespan(
        self, principal: Principal, session_id: str, workspace_id: int | None
    ) -> StudioDetails:
        async with self.db.transaction() as session:
            studio, role = await self._studio(
                session, principal, session_id, workspace_id, for_update=True
            )
            check_studio_access(studio, role, principal, Permission.EXECUTE)
            lifecycle.check_extend_lifespan(studio)
            base = base_lifespan_hours(studio, await session.get(Workspace, studio.workspace_id))
            if base <= 0:
                raise BadRequest(f"studio {session_id} has an unlimited lifespan")
            studio.lifespan_extra_hours = int(studio.lifespan_extra_hours or 0) + base
            studio.last_updated = utcnow()
            log.info("studio %s: lifespan extended by %d h", session_id, base)
            return await self._details(session, studio)

    async def compatible_compute_envs(
        self, principal: Principal, session_id: str, workspace_id: int | None
    ) -> CompatibleEnvs:
        async with self.db.transaction() as session:
            studio, _role = await self._studio(session, principal, session_id, workspace_id)
            current = await session.get(ComputeEnv, studio.compute_env_id)
            if current is None:
                raise NotFound(f"studio {session_id} has no compute environment")
            workspace = await session.get(Workspace, studio.workspace_id)
            envs = (
                await session.scalars(
                    select(ComputeEnv)
                    .where(
                        ComputeEnv.workspace_id == studio.workspace_id,
                        ComputeEnv.deleted.is_(False),
                    )
                    .order_by(ComputeEnv.name)
                )
            ).all()
            return CompatibleEnvs(
                workspace.name if workspace else "", [e for e in envs if _compatible(current, e)]
            )

    async def mounted_data_links(
        self,
        principal: Principal,
        workspace_id: int | None,
        org_id: int | None,
        status: str | None,
        exclude: str | None,
    ) -> builtins.list[str]:
        async with self.db.transaction() as session:
            if org_id is not None and workspace_id is None:
                candidates = (
                    await session.scalars(select(Workspace.id).where(Workspace.org_id == org_id))
                ).all()
                workspaces = [
                    w
                    for w in candidates
                    if await workspace_role(session, principal.user_id, w) is not None
                ]
            else:
                workspace_id = workspace_id or DEFAULT_WORKSPACE_ID
                workspace = await session.get(Workspace, workspace_id)
                if workspace is None or (org_id is not None and workspace.org_id != org_id):
                    raise NotFound(f"workspace {workspace_id} not found")
                await self._role(session, principal, workspace_id)
                workspaces = [workspace_id]
            query = select(Studio.configuration).where(
                Studio.workspace_id.in_(workspaces), Studio.deleted.is_(False)
            )
            if status:
                statuses = {s.value.lower(): s.value for s in Status}
                if status.lower() not in statuses:
                    raise BadRequest(
                        f"status: unknown studio status {status!r} "
                        f"(one of {', '.join(statuses.values())})"
                    )
                query = query.where(Studio.status == statuses[status.lower()])
            if exclude:
                query = query.where(Studio.session_id != exclude)
            ids: set[str] = set()
            for configuration in (await session.scalars(query)).all():
                configuration = configuration or {}
                for mount in configuration.get("mountDataV2") or []:
                    if isinstance(mount, dict) and mount.get("dataLinkId"):
                        ids.add(str(mount["dataLinkId"]))
                ids.update(str(i) for i in configuration.get("mountData") or [] if i)
            return sorted(ids)

    async def checkpoints(
        self,
        principal: Principal,
        session_id: str,
        workspace_id: int | None,
        page: Page,
        search: str | None = None,
    ) -> tuple[builtins.list[CheckpointRow], int]:
        words, keywords = parse_search(search, _CHECKPOINT_KEYWORDS)
        conditions: list[Any] = [_like(Checkpoint.name, w) for w in words]
        if "status" in keywords:
            conditions.append(Checkpoint.status.in_([v.lower() for v in keywords["status"]]))
        for value in keywords.get("before", []):
            conditions.append(Checkpoint.date_saved < _parse_time("before", value))
        for value in keywords.get("after", []):
            conditions.append(Checkpoint.date_saved > _parse_time("after", value))
        async with self.db.transaction() as session:
            studio, _role = await self._studio(session, principal, session_id, workspace_id)
            base = select(Checkpoint).where(Checkpoint.session_id == studio.session_id, *conditions)
            total = await session.scalar(
                select(func.count()).select_from(base.with_only_columns(Checkpoint.id).subquery())
            )
            query = base.order_by(Checkpoint.date_created.desc(), Checkpoint.id.desc()).offset(
                page.offset
            )
            if page.max is not None:
                query = query.limit(page.max)
            rows = (await session.scalars(query)).all()
            authors = await _by_id(session, User, User.id, {c.author_user_id for c in rows})
            return [CheckpointRow(c, authors.get(c.author_user_id or -1)) for c in rows], int(
                total or 0
            )

    async def connections(
        self, principal: Principal, session_id: str, workspace_id: int | None, page: Page
    ) -> tuple[builtins.list[StudioConnection], int]:
        """The studio's visits, newest first, and how many there are.

        A deleted studio's too: the audit lives as long as the workspace. Not
        `_studio`, which hides deleted studios."""
        missing = NotFound(f"studio {session_id} not found")
        async with self.db.transaction() as session:
            studio = (
                await session.get(Studio, session_id) if _SESSION_ID.match(session_id) else None
            )
            if studio is None or workspace_id not in (None, studio.workspace_id):
                raise missing
            role = await workspace_role(session, principal.user_id, studio.workspace_id)
            if role is None:
                raise missing
            require(role, Permission.AUDIT)
            where = (
                StudioConnection.session_id == studio.session_id,
                StudioConnection.workspace_id == studio.workspace_id,
            )
            total = await session.scalar(
                select(func.count()).select_from(StudioConnection).where(*where)
            )
            query = (
                select(StudioConnection)
                .where(*where)
                .order_by(StudioConnection.opened_at.desc(), StudioConnection.id.desc())
                .offset(page.offset)
                .limit(DEFAULT_PAGE_SIZE if page.max is None else page.max)
            )
            rows = (await session.scalars(query)).all()
            return builtins.list(rows), int(total or 0)

    async def build(
        self, principal: Principal, session_id: str, workspace_id: int | None
    ) -> tuple[Studio, StudioBuild | None]:
        """The studio and its custom environment's latest build (None: none has ended).

        Whoever may see the studio may read it; NotFound for a studio without a
        custom environment that never built one."""
        async with self.db.transaction() as session:
            studio, _role = await self._studio(session, principal, session_id, workspace_id)
            build = await session.get(StudioBuild, studio.session_id)
            if build is None and not (studio.configuration or {}).get("condaEnvironment"):
                raise NotFound(
                    f"studio {session_id} has no custom environment "
                    "(configuration.condaEnvironment)"
                )
            return studio, build

    async def _checkpoint(
        self, session: AsyncSession, studio: Studio, checkpoint_id: int, *, for_update: bool = False
    ) -> Checkpoint:
        checkpoint = await session.get(
            Checkpoint, checkpoint_id, with_for_update=for_update or None
        )
        if checkpoint is None or checkpoint.session_id != studio.session_id:
            raise NotFound(f"checkpoint {checkpoint_id} of studio {studio.session_id} not found")
        return checkpoint

    async def get_checkpoint(
        self, principal: Principal, session_id: str, workspace_id: int | None, checkpoint_id: int
    ) -> CheckpointRow:
        async with self.db.transaction() as session:
            studio, _role = await self._studio(session, principal, session_id, workspace_id)
            checkpoint = await self._checkpoint(session, studio, checkpoint_id)
            author = await session.get(User, checkpoint.author_user_id or -1)
            return CheckpointRow(checkpoint, author)

    async def rename_checkpoint(
        self,
        principal: Principal,
        session_id: str,
        workspace_id: int | None,
        checkpoint_id: int,
        name: str,
    ) -> CheckpointRow:
        new_name = _checkpoint_name(name)
        conflict = Conflict(f"studio {session_id} already has a checkpoint named {new_name!r}")
        try:
            async with self.db.transaction() as session:
                studio, role = await self._studio(session, principal, session_id, workspace_id)
                check_studio_access(studio, role, principal, Permission.RENAME_CHECKPOINT)
                checkpoint = await self._checkpoint(session, studio, checkpoint_id, for_update=True)
                if new_name != checkpoint.name:
                    taken = await session.scalar(
                        select(Checkpoint.id).where(
                            Checkpoint.session_id == studio.session_id,
                            Checkpoint.name == new_name,
                        )
                    )
                    if taken is not None:
                        raise conflict
                    checkpoint.name = new_name
                    await session.flush()
                author = await session.get(User, checkpoint.author_user_id or -1)
                return CheckpointRow(checkpoint, author)
        except IntegrityError:
            raise conflict from None

    async def connect_url(
        self, principal: Principal, session_id: str, workspace_id: int | None
    ) -> str:
        """Where the browser goes: the agent's proxy, with a signed connect token."""
        async with self.db.transaction() as session:
            studio, role = await self._studio(session, principal, session_id, workspace_id)
            check_studio_access(studio, role, principal, Permission.CONNECT)
            if studio.status != Status.RUNNING.value or studio.agent_id is None:
                raise Conflict(f"studio {session_id} is {studio.status}, not running")
            agent = await session.get(Agent, studio.agent_id)
        if agent is None or not self.hub.is_live(agent):
            raise Conflict(
                f"the agent of studio {session_id} is not connected; try again when it is"
            )
        parts = urlsplit(agent.proxy_url if "//" in agent.proxy_url else f"//{agent.proxy_url}")
        scheme = parts.scheme or "http"
        host = parts.hostname
        if not host:
            raise Conflict(f"agent {agent.agent_id} has no usable proxy URL")
        port = parts.port or (443 if scheme == "https" else 80)
        token = sign_connect_token(
            derive_agent_key(self.master_key, agent.agent_id),
            session_id=session_id,
            user_id=principal.user_id,
            user_name=principal.user_name,
            # The proxy refuses tokens valid for longer.
            ttl_seconds=min(self.connect_token_ttl, CONNECT_TOKEN_MAX_SECONDS),
        )
        return f"{scheme}://{session_id}.{host}:{port}/?studio-token={token}"


def _compatible(current: ComputeEnv, other: ComputeEnv) -> bool:
    return (
        other.workspace_id == current.workspace_id
        and other.platform == current.platform
        and other.work_dir.rstrip("/") == current.work_dir.rstrip("/")
    )


def _check_enabled(env: ComputeEnv) -> None:
    """No new session starts on a disabled compute environment (POST .../disable)."""
    if env.status == "DISABLED":
        raise Conflict(
            f"compute environment {env.name!r} ({env.id}) is disabled: no new sessions start "
            "on it until it is enabled again"
        )


def _contains_folded(column: Any, word: str, *, native_ascii_like: bool) -> Any:
    """`column` holds `word`, case-insensitively (`_like`).

    On SQLite `lower()` is Python's (controller.db), a call back into the interpreter
    per row: two columns of 10,000 studios took 15 ms per scan. SQLite's own LIKE folds
    ASCII letters and nothing else, so on a value that is all ASCII it matches exactly
    what Python's `lower()` would; only other values (their byte length differs from
    their length in characters) go through `lower()`."""
    if not native_ascii_like:
        return _like(column, word)
    pattern = f"%{escape_like(word.lower())}%"
    ascii_only = func.length(cast(column, LargeBinary)) == func.length(column)
    return case(
        (ascii_only, column.like(pattern, escape="\\")),
        else_=func.lower(column).like(pattern, escape="\\"),
    )


def _studio_search(
    query: Select[Any], search: str | None, *, native_ascii_like: bool = False
) -> Select[Any]:
    words, keywords = parse_search(search, _SEARCH_KEYWORDS)
    for word in words:
        query = query.where(
            or_(
                _contains_folded(Studio.name, word, native_ascii_like=native_ascii_like),
                _contains_folded(
                    Studio.template_repository, word, native_ascii_like=native_ascii_like
                ),
            )
        )
    if "status" in keywords:
        wanted = {v.lower() for v in keywords["status"]}
        statuses = [s.value for s in Status if s.value.lower() in wanted]
        query = query.where(Studio.status.in_(statuses) if statuses else false())
    if "computeEnvId" in keywords:
        query = query.where(Studio.compute_env_id.in_(keywords["computeEnvId"]))
    if "userId" in keywords:
        ids = [int(v) for v in keywords["userId"] if v.isascii() and v.isdigit() and len(v) < 19]
        names = [v for v in keywords["userId"] if not (v.isascii() and v.isdigit())]
        by_name = select(User.id).where(User.user_name.in_(names))
        query = query.where(or_(Studio.user_id.in_(ids), Studio.user_id.in_(by_name)))
    if "label" in keywords:
        query = query.where(label_search_clause(Studio.session_id, keywords["label"]))
    return query


# The parent studio of a clone, beside the clone in the list's statement.
_PARENT = aliased(Studio, name="parent")
# What the list's views read (views.studio_json, lifespan, mounts): the other columns,
# JSON among them, are not decoded for 50 rows per page.
_LIST_COLUMNS = (
    load_only(
        Studio.session_id,
        Studio.workspace_id,
        Studio.user_id,
        Studio.name,
        Studio.description,
        Studio.template_repository,
        Studio.tool,
        Studio.custom_image,
        Studio.compute_env_id,
        Studio.configuration,
        Studio.is_private,
        Studio.allowed_user_ids,
        Studio.parent_checkpoint_id,
        Studio.lifespan_extra_hours,
        Studio.status,
        Studio.status_message,
        Studio.stop_reason,
        Studio.status_updated_at,
        Studio.generation,
        Studio.progress,
        Studio.active_connections,
        Studio.data_link_status,
        Studio.date_created,
        Studio.last_updated,
        Studio.last_started,
    ),
    load_only(
        ComputeEnv.id,
        ComputeEnv.workspace_id,
        ComputeEnv.name,
        ComputeEnv.platform,
        ComputeEnv.work_dir,
        ComputeEnv.allowed_buckets,
    ),
    load_only(Workspace.id, Workspace.lifespan_hours),
    load_only(Checkpoint.id, Checkpoint.name, Checkpoint.session_id),
    load_only(_PARENT.session_id, _PARENT.name),
)


def _list_statement(matching: Select[Any]) -> Select[Any]:
    """The page of `matching` (a select of session ids) with the rows the view needs and
    the count of all of `matching` (`total`, on every row); the page is the parameters
    `offset` and `size`.

    The page's ids come from a subquery of the list index alone
    (ix_studios_live_list): a deep page skips index entries, not joined wide rows. The
    count is an uncorrelated scalar subquery, evaluated once per statement."""
    page_ids = (
        matching.order_by(Studio.date_created.desc(), Studio.session_id.desc())
        .offset(bindparam("offset"))
        .limit(bindparam("size"))
        .subquery("page")
    )
    total = select(func.count()).select_from(matching.subquery()).scalar_subquery()
    return (
        select(Studio, User, ComputeEnv, Workspace, Checkpoint, _PARENT, total.label("total"))
        .join(page_ids, page_ids.c.session_id == Studio.session_id)
        .outerjoin(User, User.id == Studio.user_id)
        .outerjoin(ComputeEnv, ComputeEnv.id == Studio.compute_env_id)
        .outerjoin(Workspace, Workspace.id == Studio.workspace_id)
        .outerjoin(Checkpoint, Checkpoint.id == Studio.parent_checkpoint_id)
        .outerjoin(_PARENT, _PARENT.session_id == Checkpoint.session_id)
        .options(*_LIST_COLUMNS)
        .order_by(Studio.date_created.desc(), Studio.session_id.desc())
    )


# The studios every list starts from (parameter `workspace_id`), and its statement
# without a search.
_LIVE_STUDIOS = select(Studio.session_id).where(
    Studio.workspace_id == bindparam("workspace_id"), Studio.deleted.is_(False)
)
_PLAIN_LIST = _list_statement(_LIVE_STUDIOS)


async def _by_id(session: AsyncSession, model: Any, column: Any, ids: set[Any]) -> dict[Any, Any]:
    ids = {i for i in ids if i is not None}
    if not ids:
        return {}
    rows = (await session.scalars(select(model).where(column.in_(ids)))).all()
    return {getattr(r, column.key): r for r in rows}
