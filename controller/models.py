"""ORM models (SQLAlchemy 2, typed declarative).

The schema itself is owned by the Alembic migrations in
`controller/migrations/versions/`; a test checks that these models and the
migrations agree. Times are stored as timezone-aware UTC (SQLite gives them
back naive: `as_utc` restores the zone).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Agent",
    "ApiToken",
    "Base",
    "Checkpoint",
    "CheckpointGcRun",
    "ComputeEnv",
    "ControllerSecret",
    "Credentials",
    "DataLink",
    "EnrollmentToken",
    "IdempotencyKey",
    "JobLease",
    "Label",
    "OrgMember",
    "Organization",
    "Participant",
    "Studio",
    "StudioConnection",
    "StudioLabel",
    "StudioRun",
    "Team",
    "TeamMember",
    "User",
    "Workspace",
    "as_utc",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class Organization(Base):
    """An organisation (controller.orgs_service). A deleted one is kept (its workspaces'
    studios keep their checkpoints for garbage collection) under a name no live
    organisation can take (`deleted_name`), so its own name is free again."""

    __tablename__ = "organizations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    full_name: Mapped[str] = mapped_column(String(100), default="", server_default="")
    description: Mapped[str | None] = mapped_column(Text, default=None)
    location: Mapped[str | None] = mapped_column(String(100), default=None)
    website: Mapped[str | None] = mapped_column(Text, default=None)
    logo_id: Mapped[str | None] = mapped_column(String(64), default=None)
    date_created: Mapped[datetime] = mapped_column(default=utcnow)
    last_updated: Mapped[datetime | None] = mapped_column(default=None)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Workspace(Base):
    """A workspace of an organisation; deleted ones are kept as organisations are."""

    __tablename__ = "workspaces"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_workspaces_org_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    name: Mapped[str] = mapped_column(String(80))
    full_name: Mapped[str] = mapped_column(String(100), default="", server_default="")
    description: Mapped[str | None] = mapped_column(Text, default=None)
    # PRIVATE: its participants only; SHARED: every member of the organisation sees it.
    visibility: Mapped[str] = mapped_column(String(16), default="PRIVATE", server_default="PRIVATE")
    # Studios workspace settings: 0 = unlimited.
    lifespan_hours: Mapped[int] = mapped_column(Integer, default=0)
    private_studio_by_default: Mapped[bool] = mapped_column(Boolean, default=False)
    date_created: Mapped[datetime] = mapped_column(default=utcnow)
    last_updated: Mapped[datetime | None] = mapped_column(default=None)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class User(Base):
    """A user. Deleted users are kept (studios, checkpoints and audit rows name them) but
    have no tokens, memberships or roles left, and `deleted` refuses them at sign-in."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_name: Mapped[str] = mapped_column(String(80), unique=True)
    email: Mapped[str] = mapped_column(String(255))
    date_created: Mapped[datetime] = mapped_column(default=utcnow)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    date_deleted: Mapped[datetime | None] = mapped_column(default=None)


class OrgMember(Base):
    """A user's role in an organisation: owner, member or collaborator.

    The API's `memberId` is the user id (unique within an organisation), as it is for
    workspace participants and team members."""

    __tablename__ = "org_members"

    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True, index=True)
    role: Mapped[str] = mapped_column(String(16))
    date_created: Mapped[datetime] = mapped_column(default=utcnow)


class Team(Base):
    """A named group of users of an organisation; a team participant gives its role to all."""

    __tablename__ = "teams"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_teams_org_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    name: Mapped[str] = mapped_column(String(80))
    description: Mapped[str | None] = mapped_column(Text, default=None)
    date_created: Mapped[datetime] = mapped_column(default=utcnow)


class TeamMember(Base):
    __tablename__ = "team_members"
    __table_args__ = (UniqueConstraint("team_id", "user_id", name="uq_team_members_team_user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    date_created: Mapped[datetime] = mapped_column(default=utcnow)


class Participant(Base):
    """A role in a workspace, held by a user (user_id) or by a team (team_id)."""

    __tablename__ = "participants"
    __table_args__ = (
        UniqueConstraint("workspace_id", "user_id", name="uq_participants_workspace_user"),
        UniqueConstraint("workspace_id", "team_id", name="uq_participants_workspace_team"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    team_id: Mapped[int | None] = mapped_column(ForeignKey("teams.id"), default=None)
    role: Mapped[str] = mapped_column(String(16))
    date_created: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(80))
    # sha256 hex of the token: the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    date_created: Mapped[datetime] = mapped_column(default=utcnow)
    last_used: Mapped[datetime | None] = mapped_column(default=None)


class EnrollmentToken(Base):
    """Join tokens: an agent exchanges one for its certificate (controller.enrollment).

    The secret part only, hashed (the CA hash of a join token is the controller's own).
    A token admits the compute environment it is bound to, or (unbound) any compute
    environment of its workspace; it may expire, be used up or be revoked."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    date_created: Mapped[datetime] = mapped_column(default=utcnow)
    last_used: Mapped[datetime | None] = mapped_column(default=None)
    compute_env_id: Mapped[str | None] = mapped_column(String(16), default=None)
    workspace_id: Mapped[int | None] = mapped_column(Integer, default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # None: any number of enrollments.
    max_uses: Mapped[int | None] = mapped_column(Integer, default=None)
    uses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class ComputeEnv(Base):
    __tablename__ = "compute_envs"
    __table_args__ = (
        # Names are unique among the live environments of a workspace; a deleted one
        # (kept: deleted studios still refer to it) frees its name.
        Index(
            "uq_compute_envs_workspace_name_live",
            "workspace_id",
            "name",
            unique=True,
            sqlite_where=text("NOT deleted"),
            postgresql_where=text("NOT deleted"),
        ),
    )

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"))
    name: Mapped[str] = mapped_column(String(100))
    platform: Mapped[str] = mapped_column(String(32))
    work_dir: Mapped[str] = mapped_column(Text)
    boot_disk_size_gb: Mapped[int] = mapped_column(Integer, default=30)
    # The most one session may grow to on a host; None: the whole budget (sessionDiskCapGb).
    session_disk_cap_gb: Mapped[int | None] = mapped_column(Integer, default=None)
    allowed_buckets: Mapped[list[str]] = mapped_column(JSON, default=list)
    # [{"hostPath", "mountPath", "readOnly"}] (controller.mounts validates them).
    file_system_mounts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    description: Mapped[str | None] = mapped_column(Text, default=None)
    # The reference's ComputeEnv.Status values we use: AVAILABLE, or DISABLED (no new
    # starts: controller.placement and the studios service refuse them).
    status: Mapped[str] = mapped_column(String(16), default="AVAILABLE", server_default="AVAILABLE")
    # At most one primary environment per workspace (compute_envs_service keeps it so).
    is_primary: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # When a session of it last started.
    last_used: Mapped[datetime | None] = mapped_column(default=None)
    # Deleted environments are kept (studios, live or deleted, refer to them) but gone from
    # the API.
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    date_created: Mapped[datetime] = mapped_column(default=utcnow)
    last_updated: Mapped[datetime] = mapped_column(default=utcnow)


class Agent(Base):
    __tablename__ = "agents"

    agent_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), default="")
    compute_env_id: Mapped[str] = mapped_column(String(16), index=True)
    runtime: Mapped[str] = mapped_column(String(32), default="")
    proxy_url: Mapped[str] = mapped_column(Text, default="")
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    connected: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[datetime | None] = mapped_column(default=None)
    # What the agent reports, clamped to `capacity_cap` (placement.clamp_capacity).
    capacity: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    date_created: Mapped[datetime] = mapped_column(default=utcnow)
    # Enrollment (controller.enrollment): when, the newest certificate's serial (hex) and
    # end; a revoked agent is refused and its id never comes back.
    enrolled_at: Mapped[datetime | None] = mapped_column(default=None)
    cert_serial: Mapped[str | None] = mapped_column(String(64), default=None)
    cert_not_after: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # The operator's cap on reported capacity, field by field (the capacity's keys);
    # by default what the host reported at enrollment. {}: none yet.
    capacity_cap: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    # The controller holding the agent's stream and until when (controller.agent_service): a
    # lease that has run out means the agent is not connected, whatever `connected` says.
    controller_id: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # `studio-agent drain` as the agent last said (Hello, Heartbeat): "" not draining,
    # "stop" or "wait" (controller.agent_service); placement skips a draining agent.
    drain: Mapped[str] = mapped_column(String(8), default="", server_default="")


class Studio(Base):
    __tablename__ = "studios"
    __table_args__ = (
        # Names are unique among the live studios of a workspace; a deleted
        # studio (kept for its checkpoints) frees its name.
        Index(
            "uq_studios_workspace_name_live",
            "workspace_id",
            "name",
            unique=True,
            sqlite_where=text("NOT deleted"),
            postgresql_where=text("NOT deleted"),
        ),
        # GET /studios from the index alone: its filter (workspace, live), its default
        # order, and the columns of a free-text search (migration 0015).
        Index(
            "ix_studios_live_list",
            "workspace_id",
            "deleted",
            "date_created",
            "session_id",
            "name",
            "template_repository",
        ),
        # The deadline, lost-agent and reconciler passes look for the few studios in a
        # given status among many stopped ones (migration 0017).
        Index("ix_studios_status", "status"),
    )

    session_id: Mapped[str] = mapped_column(String(8), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(80))
    description: Mapped[str | None] = mapped_column(Text, default=None)
    template_repository: Mapped[str] = mapped_column(Text)
    tool: Mapped[str] = mapped_column(String(80))
    custom_image: Mapped[bool] = mapped_column(Boolean, default=False)
    compute_env_id: Mapped[str] = mapped_column(ForeignKey("compute_envs.id"))
    configuration: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    is_private: Mapped[bool] = mapped_column(Boolean, default=False)
    # Users besides the creator who may connect to a private studio.
    allowed_user_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    # A clone ("add as new"): the checkpoint its first start restores.
    parent_checkpoint_id: Mapped[int | None] = mapped_column(Integer, default=None)
    # Hours added to the lifespan of the current run (POST .../lifespan); 0 at each start.
    lifespan_extra_hours: Mapped[int] = mapped_column(Integer, default=0)
    # Lifecycle (controller.lifecycle owns every change of these four).
    status: Mapped[str] = mapped_column(String(16))
    status_message: Mapped[str | None] = mapped_column(Text, default=None)
    stop_reason: Mapped[str | None] = mapped_column(String(32), default=None)
    status_updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # What the agent is told: "running", "stopped" or "deleted".
    desired_status: Mapped[str] = mapped_column(String(16), default="stopped")
    # Incremented on every start; observations of older generations are ignored.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    agent_id: Mapped[str | None] = mapped_column(String(128), default=None, index=True)
    placed_at: Mapped[datetime | None] = mapped_column(default=None)
    restore_checkpoint_id: Mapped[int | None] = mapped_column(Integer, default=None)
    started_by_user_id: Mapped[int | None] = mapped_column(Integer, default=None)
    tool_port: Mapped[int | None] = mapped_column(Integer, default=None)
    root_dir: Mapped[str | None] = mapped_column(Text, default=None)
    progress: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    volume: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Who is connected through the agent's proxy, as the API shows it:
    # [{id, userName, email, avatar, lastActive}] (see observed.connections).
    active_connections: Mapped[list[dict[str, Any]]] = mapped_column(
        JSON, default=list, server_default="[]"
    )
    # What the agent reports about the data-link mounts of a run (observed.py):
    # {"generation": n, "mounts": [{dataLinkId, mountName, state, message}]}.
    data_link_status: Mapped[dict[str, Any]] = mapped_column(
        JSON, default=dict, server_default="{}"
    )
    date_created: Mapped[datetime] = mapped_column(default=utcnow)
    last_updated: Mapped[datetime] = mapped_column(default=utcnow)
    last_started: Mapped[datetime | None] = mapped_column(default=None)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    date_deleted: Mapped[datetime | None] = mapped_column(default=None)


class Label(Base):
    """A label of a workspace (Seqera's `/labels`): a simple label (a name) or a resource
    label (`name=value`, `resource`). Simple labels store the value as "" so that the
    unique constraint covers them too. Default labels go on new studios that name none."""

    __tablename__ = "labels"
    __table_args__ = (
        UniqueConstraint("workspace_id", "name", "value", name="uq_labels_workspace_name_value"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"), index=True)
    name: Mapped[str] = mapped_column(String(39))
    value: Mapped[str] = mapped_column(String(39), default="", server_default="")
    resource: Mapped[bool] = mapped_column(Boolean, default=False)
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    date_created: Mapped[datetime] = mapped_column(default=utcnow)


class StudioLabel(Base):
    """A label attached to a studio."""

    __tablename__ = "studio_labels"

    session_id: Mapped[str] = mapped_column(ForeignKey("studios.session_id"), primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id"), primary_key=True, index=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (
        UniqueConstraint("session_id", "key", name="uq_checkpoints_session_key"),
        UniqueConstraint("session_id", "name", name="uq_checkpoints_session_name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("studios.session_id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(Text)
    uri: Mapped[str] = mapped_column(Text)
    # empty | interim | finalized | invalid
    status: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    author_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    date_created: Mapped[datetime] = mapped_column(default=utcnow)
    date_saved: Mapped[datetime] = mapped_column(default=utcnow)
    # The final checkpoint of a run that an agent held on to after the studio had moved
    # on (a lost agent come back): kept by name, never the studio's default restore point.
    recovered_from_agent: Mapped[str | None] = mapped_column(String(128), default=None)


class StudioRun(Base):
    """A run (generation) of a studio that the controller left behind on an agent (a
    start elsewhere after the agent was lost): that agent may still report its final
    checkpoint, and only that agent, only of that generation (controller.agent_authorizer)."""

    __tablename__ = "studio_runs"

    session_id: Mapped[str] = mapped_column(ForeignKey("studios.session_id"), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(128))
    left_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """The first answer to a request sent with an `Idempotency-Key` (controller.idempotency).

    The primary key makes two concurrent requests with one key race on the insert, not
    on a check: exactly one of them runs the operation."""

    __tablename__ = "idempotency_keys"

    user_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The operation ("create", "start:<sessionId>") and the client's key.
    operation: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # sha256 of the canonical request body: the same key with another body is refused.
    request_hash: Mapped[str] = mapped_column(String(64))
    # None while the first request is still being carried out.
    status: Mapped[int | None] = mapped_column(Integer, default=None)
    body: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class StudioBuild(Base):
    """The latest build of a studio's custom environment (`condaEnvironment`), as its
    agent reported it when the build ended: the image it gave, or the failure's log
    (`GET /studios/{sessionId}/build`). Kept apart from the studio row: a log is up to
    256 KiB and listings never need it."""

    __tablename__ = "studio_builds"

    session_id: Mapped[str] = mapped_column(ForeignKey("studios.session_id"), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer)
    env_hash: Mapped[str] = mapped_column(String(64), default="")
    image: Mapped[str] = mapped_column(Text, default="")
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    failed: Mapped[bool] = mapped_column(Boolean, default=False)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    log: Mapped[str] = mapped_column(Text, default="")
    log_truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)


class ControllerSecret(Base):
    """A secret every controller of the database shares, sealed (controller.shared_secrets)."""

    __tablename__ = "controller_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    sealed: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobLease(Base):
    """Which controller runs a background job, until when (controller.leader)."""

    __tablename__ = "job_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column()
    # Changes with every new holder; `passes` counts the passes run under the lease.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    passes: Mapped[int] = mapped_column(BigInteger, default=0)


class CheckpointGcRun(Base):
    """One garbage collection of a checkpoint store (controller.checkpoint_gc)."""

    __tablename__ = "checkpoint_gc_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The store (`<workDir>/.studios/checkpoints`) and a compute env that uses it.
    base_uri: Mapped[str] = mapped_column(Text, index=True)
    compute_env_id: Mapped[str] = mapped_column(String(16), index=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    ok: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    deleted_manifests: Mapped[int] = mapped_column(Integer, default=0)
    deleted_packs: Mapped[int] = mapped_column(Integer, default=0)
    freed_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Objects whose deletion failed: [[name, error], ...]; garbage for the next run.
    failed: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # Why the run did not finish (the store was down, ...), or why packs were kept.
    message: Mapped[str | None] = mapped_column(Text, default=None)


class Credentials(Base):
    """Keys of a cloud store (S3 or S3-compatible), for data-links of one workspace.

    The secret part (access key and secret key) is only ever stored encrypted
    (`secret`, see controller.secret_box); nothing in the API returns it.
    """

    __tablename__ = "credentials"
    __table_args__ = (
        UniqueConstraint("workspace_id", "name", name="uq_credentials_workspace_name"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(Text, default=None)
    provider: Mapped[str] = mapped_column(String(16))
    # S3-compatible endpoint URL; None for AWS itself.
    base_url: Mapped[str | None] = mapped_column(Text, default=None)
    region: Mapped[str | None] = mapped_column(String(64), default=None)
    secret: Mapped[str] = mapped_column(Text)
    date_created: Mapped[datetime] = mapped_column(default=utcnow)
    last_updated: Mapped[datetime] = mapped_column(default=utcnow)
    last_used: Mapped[datetime | None] = mapped_column(default=None)


class DataLink(Base):
    """A bucket, or a prefix of one, that studios of the workspace can mount."""

    __tablename__ = "data_links"
    __table_args__ = (
        UniqueConstraint("workspace_id", "name", name="uq_data_links_workspace_name"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(Text, default=None)
    provider: Mapped[str] = mapped_column(String(16))
    type: Mapped[str] = mapped_column(String(16), default="bucket")
    # Normalised "s3://bucket" or "s3://bucket/sub/dir" (no trailing slash).
    resource_ref: Mapped[str] = mapped_column(Text)
    region: Mapped[str | None] = mapped_column(String(64), default=None)
    credentials_id: Mapped[str | None] = mapped_column(
        ForeignKey("credentials.id"), default=None, index=True
    )
    public_accessible: Mapped[bool] = mapped_column(Boolean, default=False)
    date_created: Mapped[datetime] = mapped_column(default=utcnow)
    last_updated: Mapped[datetime] = mapped_column(default=utcnow)


class StudioConnection(Base):
    """One visit of a user to a studio through its agent's connect proxy (the
    connection audit): who, which studio, from where, when, how long.

    Not tied to the studio row (kept after the studio is deleted, with a snapshot of
    its name), only to the workspace: it goes when the workspace goes. Recorded from
    the agent's `ConnectionVisit` reports (controller.observed), each (agent, visit id)
    once.
    """

    __tablename__ = "studio_connections"
    __table_args__ = (
        UniqueConstraint("agent_id", "visit_id", name="uq_studio_connections_agent_visit"),
        # The listing: a studio's visits, newest first.
        Index("ix_studio_connections_session_opened", "session_id", "opened_at", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    session_id: Mapped[str] = mapped_column(String(8))
    studio_name: Mapped[str] = mapped_column(String(80))
    # The agent that reported it, its random id for the visit, and the run of its proxy
    # that saw it (Hello.proxy_instance_id): a new run closes what an old one left open.
    agent_id: Mapped[str] = mapped_column(String(128))
    visit_id: Mapped[str] = mapped_column(String(32))
    proxy_instance_id: Mapped[str] = mapped_column(String(32))
    # No foreign key: the record outlives whatever happens to the user.
    user_id: Mapped[int] = mapped_column(BigInteger)
    user_name: Mapped[str] = mapped_column(String(255))
    client_address: Mapped[str] = mapped_column(String(64))
    opened_at: Mapped[datetime] = mapped_column()
    closed_at: Mapped[datetime | None] = mapped_column(default=None)
    # Why the close time is not the proxy's own: "agentRestart" (the proxy that saw
    # the visit is gone; closed_at is when the controller learned it). None otherwise.
    closed_by: Mapped[str | None] = mapped_column(String(16), default=None)
