"""Database rows to API response bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from controller.datalink_views import mounted_data_link_view
from controller.lifecycle import Status
from controller.lifespan import effective_lifespan_hours
from controller.models import (
    Agent,
    ApiToken,
    CheckpointGcRun,
    ComputeEnv,
    Label,
    Studio,
    StudioBuild,
    StudioConnection,
    User,
    Workspace,
    as_utc,
)
from controller.org_responses import MemberDbDto
from controller.org_roles import MemberRow
from controller.responses import (
    AccessTokenDto,
    AgentDto,
    CheckpointDto,
    ComputeEnvDto,
    DataStudioDto,
    DataStudioStartResponse,
    DataStudioStatusInfo,
    DataStudioStopResponse,
    DataStudioWorkspaceSettingsResponse,
    LabelDbDto,
    ParticipantDto,
    StudioBuildDto,
    StudioConnectionDto,
    StudioConnectionUser,
    UnknownUser,
    UserInfo,
)
from controller.studios_service import CheckpointRow, CompatibleEnvs, StudioDetails, StudioRun
from controller.workspaces_service import ParticipantRow

__all__ = [
    "access_token_dto",
    "agent_dto",
    "checkpoint_dto",
    "compatible_env_dtos",
    "compute_env_dto",
    "connection_dto",
    "gc_run_json",
    "iso",
    "label_dto",
    "label_json",
    "participant_dto",
    "start_response",
    "status_info",
    "stop_response",
    "studio_dto",
    "studio_json",
    "user_info",
    "workspace_settings_dto",
]


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` without those that have no value: absent, never null (issue 14)."""
    return {k: v for k, v in fields.items() if v is not None}


def iso(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with milliseconds, e.g. 2024-05-01T12:00:00.000Z."""
    value = as_utc(value)
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def user_info(user: User | None) -> UserInfo | None:
    if user is None:
        return None
    return UserInfo(id=user.id, user_name=user.user_name, email=user.email)


def status_info(studio: Studio) -> DataStudioStatusInfo:
    return DataStudioStatusInfo(
        status=studio.status,
        message=studio.status_message,
        last_update=iso(studio.status_updated_at),
        stop_reason=studio.stop_reason,
    )


def _with_warning(info: DataStudioStatusInfo, studio: Studio, warning: str | None) -> None:
    """A session of a deprecated or experimental template says so while it starts and runs."""
    if warning and studio.status in ("starting", "running"):
        info.message = f"{info.message}; {warning}" if info.message else warning


def start_response(session_id: str, run: StudioRun) -> DataStudioStartResponse:
    info = status_info(run.studio)
    _with_warning(info, run.studio, run.template_warning)
    return DataStudioStartResponse(
        job_submitted=run.submitted, session_id=session_id, status_info=info
    )


def stop_response(session_id: str, run: StudioRun) -> DataStudioStopResponse:
    return DataStudioStopResponse(
        job_submitted=run.submitted, session_id=session_id, status_info=status_info(run.studio)
    )


def studio_dto(details: StudioDetails, public_url: str) -> DataStudioDto:
    return DataStudioDto.model_validate(studio_json(details, public_url))


def _user_json(user: User) -> dict[str, Any]:
    return {"id": user.id, "userName": user.user_name, "email": user.email}


def studio_json(details: StudioDetails, public_url: str, *, labels: bool = False) -> dict[str, Any]:
    """A studio's DataStudioDto as its JSON object, built directly: a page of `GET
    /studios` is 50 of them, and the pydantic models cost about 4 ms to build and 4 ms to
    serialise per page (issue 16). `studio_dto` validates this against the model, and
    tests/controller/test_list_json.py checks that the model gives back the same JSON,
    key for key and in order: keys follow DataStudioDto's fields, and one without a
    value is absent (controller.response_model). With `labels`, the studio's labels."""
    studio, compute_env, parent = details.studio, details.compute_env, details.parent
    mounted_data_links = [mounted_data_link_view(m) for m in details.mounts]
    entry = details.template
    configuration = studio.configuration or {}
    status = studio.status
    message = studio.status_message
    warning = details.template_warning
    active = status in ("starting", "running")
    if warning and active:
        # A session of a deprecated or experimental template says so while it starts and runs.
        message = f"{message}; {warning}" if message else warning
    problems = [
        str(m["message"])
        for m in mounted_data_links
        if m.get("status") == "INVALID" and m.get("message")
    ]
    if problems and active:
        # A data-link the session runs without says so where users look first.
        message = "; ".join([message, *problems] if message else problems)
    base = public_url.rstrip("/")
    owner = details.owner
    out: dict[str, Any] = {
        "sessionId": studio.session_id,
        "workspaceId": studio.workspace_id,
        "user": (
            _user_json(owner)
            if owner is not None
            else {"id": studio.user_id, "userName": "", "email": ""}
        ),
        "name": studio.name,
    }
    if studio.description is not None:
        out["description"] = studio.description
    template = {"repository": studio.template_repository, "tool": studio.tool}
    if entry is not None:
        if entry.status is not None:
            template["status"] = entry.status
        if entry.icon is not None:
            template["icon"] = entry.icon
    out["template"] = template
    out["customImage"] = studio.custom_image
    if compute_env is not None:
        out["computeEnv"] = {
            "id": compute_env.id,
            "name": compute_env.name,
            "platform": compute_env.platform,
            "workDir": compute_env.work_dir,
        }
    out["configuration"] = configuration
    out["dateCreated"] = iso(studio.date_created) or ""
    out["lastUpdated"] = iso(studio.last_updated) or ""
    last_started = iso(studio.last_started)
    if last_started is not None:
        out["lastStarted"] = last_started
    info: dict[str, Any] = {"status": status}
    if message is not None:
        info["message"] = message
    last_update = iso(studio.status_updated_at)
    if last_update is not None:
        info["lastUpdate"] = last_update
    if studio.stop_reason is not None:
        info["stopReason"] = studio.stop_reason
    out["statusInfo"] = info
    out["studioUrl"] = f"{base}/studios/{studio.session_id}/connect"
    if configuration.get("condaEnvironment"):
        # Where the reference links its Wave build: here, the build's own resource.
        out["waveBuildUrl"] = (
            f"{base}/studios/{studio.session_id}/build?workspaceId={studio.workspace_id}"
        )
    out["progress"] = [
        {"message": step["message"], "status": step["status"], "warnings": step.get("warnings", [])}
        for step in studio.progress or ()
    ]
    out["activeConnections"] = [_connection_json(c) for c in studio.active_connections or ()]
    out["isPrivate"] = studio.is_private
    out["allowedUsers"] = [_user_json(u) for u in details.allowed_users]
    out["effectiveLifespanHours"] = effective_lifespan_hours(studio, details.workspace)
    if parent is not None:
        out["parentCheckpoint"] = {
            "checkpointId": parent[0].id,
            "checkpointName": parent[0].name,
            "sessionId": parent[1].session_id,
            "studioName": parent[1].name,
        }
    out["mountedDataLinks"] = mounted_data_links
    if labels:
        out["labels"] = [label_json(label) for label in details.labels]
    return out


def _connection_json(connection: dict[str, Any]) -> dict[str, Any]:
    """An entry of `activeConnections` (ActiveConnection) from the studio's stored list."""
    out = {
        "id": connection["id"],
        "userName": connection.get("userName", ""),
        "email": connection.get("email", ""),
    }
    for key in ("avatar", "lastActive"):
        if connection.get(key) is not None:
            out[key] = connection[key]
    return out


def checkpoint_dto(row: CheckpointRow) -> CheckpointDto:
    checkpoint = row.checkpoint
    # The reference requires an author: one whose record is gone is shown by id alone.
    author = user_info(row.author) or UnknownUser(id=checkpoint.author_user_id)
    return CheckpointDto(
        id=checkpoint.id,
        name=checkpoint.name,
        path=checkpoint.uri,
        status=checkpoint.status,
        author=author,
        date_created=iso(checkpoint.date_created) or "",
        date_saved=iso(checkpoint.date_saved) or "",
    )


def connection_dto(row: StudioConnection) -> StudioConnectionDto:
    """A visit of the connection audit: `closedAt` and `durationSeconds` once closed."""
    opened = as_utc(row.opened_at)
    closed = as_utc(row.closed_at)
    return StudioConnectionDto(
        id=row.id,
        user=StudioConnectionUser(id=row.user_id, user_name=row.user_name),
        client_address=row.client_address,
        opened_at=iso(opened) or "",
        closed_at=iso(closed),
        duration_seconds=(round((closed - opened).total_seconds()) if closed and opened else None),
        closed_by=row.closed_by,
    )


def build_dto(studio: Studio, build: StudioBuild | None) -> StudioBuildDto:
    """The studio's build: what runs now when it is building, else the last that ended."""
    if Status(studio.status) == Status.BUILDING:
        step = next((p for p in studio.progress or () if p.get("status") == "in-progress"), None)
        return StudioBuildDto(
            session_id=studio.session_id,
            status="building",
            progress=str(step.get("message") or "") or None if step else None,
        )
    if build is None:
        return StudioBuildDto(session_id=studio.session_id, status="pending")
    return StudioBuildDto(
        session_id=studio.session_id,
        status="failed" if build.failed else "succeeded",
        generation=build.generation,
        environment_hash=build.env_hash or None,
        image=build.image or None,
        cached=build.cached,
        duration_seconds=build.seconds,
        finished_at=iso(as_utc(build.finished_at)),
        log=build.log if build.failed else None,
        log_truncated=build.log_truncated if build.failed else None,
    )


def compute_env_dto(env: ComputeEnv, workspace_name: str) -> ComputeEnvDto:
    return ComputeEnvDto(
        id=env.id,
        name=env.name,
        platform=env.platform,
        work_dir=env.work_dir,
        workspace_name=workspace_name,
        date_created=iso(env.date_created) or "",
        last_updated=iso(env.last_updated) or "",
        config=_present(
            {
                "workDir": env.work_dir,
                "bootDiskSizeGb": env.boot_disk_size_gb,
                # Absent: no cap of the session's own.
                "sessionDiskCapGb": env.session_disk_cap_gb,
                "allowedBuckets": list(env.allowed_buckets or []),
                "fileSystemMounts": list(env.file_system_mounts or []),
            }
        ),
    )


def compatible_env_dtos(compatible: CompatibleEnvs) -> list[ComputeEnvDto]:
    return [compute_env_dto(e, compatible.workspace_name) for e in compatible.envs]


def agent_dto(agent: Agent, connected: bool) -> AgentDto:
    return AgentDto(
        id=agent.agent_id,
        hostname=agent.hostname,
        compute_env_id=agent.compute_env_id,
        runtime=agent.runtime,
        proxy_url=agent.proxy_url,
        agent_version=agent.agent_version,
        connected=connected,
        last_seen=iso(agent.last_seen),
        capacity=agent.capacity or {},
        draining=bool(agent.drain),
        drain_mode=agent.drain or None,
    )


def access_token_dto(token: ApiToken) -> AccessTokenDto:
    return AccessTokenDto(
        id=token.id,
        name=token.name,
        date_created=iso(token.date_created) or "",
        last_used=iso(token.last_used),
    )


def gc_run_json(run: CheckpointGcRun) -> dict[str, Any]:
    """A checkpoint GC run as shown in a compute environment's `checkpointGc`."""
    return _present(
        {
            "baseUri": run.base_uri,
            "startedAt": iso(run.started_at),
            "finishedAt": iso(run.finished_at),
            "ok": run.ok,
            "attempts": run.attempts,
            "deletedManifests": run.deleted_manifests,
            "deletedPacks": run.deleted_packs,
            "freedBytes": run.freed_bytes,
            "failed": [list(f) for f in run.failed or []],
            "message": run.message,
        }
    )


def participant_dto(row: ParticipantRow) -> ParticipantDto:
    p = row.participant
    if p.team_id is not None:
        return ParticipantDto(
            participant_id=p.id,
            type="TEAM",
            wsp_role=p.role,
            team_id=p.team_id,
            team_name=row.team.name if row.team else None,
        )
    # The reference's participant types: a collaborator of the organisation is listed as
    # such, owners and members as MEMBER.
    collaborator = row.org_role is not None and row.org_role.value == "collaborator"
    return ParticipantDto(
        participant_id=p.id,
        type="COLLABORATOR" if collaborator else "MEMBER",
        wsp_role=p.role,
        member_id=p.user_id,
        user_name=row.user.user_name if row.user else None,
        email=row.user.email if row.user else None,
        org_role=row.org_role.value if row.org_role else None,
    )


def workspace_settings_dto(workspace: Workspace) -> DataStudioWorkspaceSettingsResponse:
    return DataStudioWorkspaceSettingsResponse(
        org_id=workspace.org_id,
        wsp_id=workspace.id,
        lifespan_hours=workspace.lifespan_hours,
        private_studio_by_default=workspace.private_studio_by_default,
    )


def label_dto(label: Label) -> LabelDbDto:
    """The reference's LabelDbDto; a simple label has no `value`."""
    return LabelDbDto.model_validate(label_json(label))


def label_json(label: Label) -> dict[str, Any]:
    """`label_dto`'s JSON object, built directly (`studio_json`'s reason)."""
    out: dict[str, Any] = {"id": label.id, "name": label.name}
    if label.resource and label.value is not None:
        out["value"] = label.value
    out["resource"] = label.resource
    out["isDefault"] = label.is_default
    out["dateCreated"] = iso(label.date_created) or ""
    return out


def member_dto(row: MemberRow) -> MemberDbDto:
    """An organisation member, or a team member with their organisation role."""
    return MemberDbDto(
        member_id=row.user.id,
        user_id=row.user.id,
        user_name=row.user.user_name,
        email=row.user.email,
        role=row.role.value,
    )
