"""Data-links as studios see them: the check of a studio's `mountDataV2`, and
the `mountedDataLinks` of the studio's API view.

Kept apart from `controller.datalinks_service` so that the studios service
can use it without importing the data-link endpoints' service.

`mountedDataLinks`: one entry per data-link of the configuration, in order:
a DataLinkDto (the reference's shape) plus `mountName`, `mountPath`,
`readOnly` and `mountState` (what the agent reports for the current run:
"mounted", "read-only", "failed", "unmounted", or null). `status` is INVALID
with a `message` when the data-link no longer exists or its mount failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.errors import BadRequest
from controller.models import ComputeEnv, Credentials, DataLink, Studio
from controller.mounts import (
    DATA_DIR,
    PlannedMount,
    load_credentials,
    load_links,
    plan_mounts,
    validate_sub_path,
)
from controller.requests import DataStudioConfiguration
from controller.responses import DataLinkCredentialsDto, DataLinkDto

__all__ = ["check_mount_data", "data_link_dto", "mounted_data_link_views"]


def data_link_dto(link: DataLink, cred: Credentials | None) -> DataLinkDto:
    return DataLinkDto(
        id=link.id,
        name=link.name,
        description=link.description,
        resource_ref=link.resource_ref,
        type=link.type,
        provider=link.provider,
        region=link.region or (cred.region if cred else None),
        credentials=(
            [DataLinkCredentialsDto(id=cred.id, name=cred.name, provider=cred.provider)]
            if cred
            else []
        ),
        status="VALID",
        public_accessible=link.public_accessible,
    )


async def check_mount_data(
    session: AsyncSession, workspace_id: int, configuration: DataStudioConfiguration | None
) -> None:
    """400 naming the entry unless every data-link of the configuration is in the workspace."""
    if configuration is None:
        return
    wanted: list[tuple[str, str]] = []
    for n, mount in enumerate(configuration.mount_data_v2 or []):
        field = f"configuration.mountDataV2.{n}"
        if mount.path is not None:
            validate_sub_path(mount.path, f"{field}.path")
        wanted.append((mount.data_link_id, f"{field}.dataLinkId"))
    for n, link_id in enumerate(configuration.mount_data or []):
        wanted.append((link_id, f"configuration.mountData.{n}"))
    if not wanted:
        return
    found = set(
        (
            await session.scalars(
                select(DataLink.id).where(
                    DataLink.id.in_({i for i, _ in wanted}), DataLink.workspace_id == workspace_id
                )
            )
        ).all()
    )
    for link_id, field in wanted:
        if link_id not in found:
            raise BadRequest(
                f"{field}: data-link {link_id!r} not found in workspace {workspace_id}"
            )


def _mount_view(
    planned: PlannedMount,
    cred: Credentials | None,
    reported: dict[str, Any] | None,
    active: bool,
) -> dict[str, Any]:
    """One entry of a studio's `mountedDataLinks`: a DataLinkDto plus where and how it mounts."""
    state = reported.get("state") if reported else None
    mount_name = planned.mount_name or (reported.get("mountName") if reported else None)
    if planned.link is not None:
        view = data_link_dto(planned.link, cred).dump()
        view["resourceRef"] = planned.resource_ref
    else:
        view = {
            "id": planned.data_link_id,
            "name": mount_name or planned.data_link_id,
            "resourceRef": "",
            "type": "bucket",
            "provider": "aws",
            "credentials": [],
            "publicAccessible": False,
            "hidden": False,
        }
    message = planned.problem
    if message and active and state in ("mounted", "read-only"):
        message += "; the running session keeps its mount until it stops"
    if state == "failed":
        message = (reported or {}).get("message") or "the mount failed"
    view["status"] = "INVALID" if message else "VALID"
    view["message"] = message
    view["mountName"] = mount_name
    view["mountPath"] = f"{DATA_DIR}/{mount_name}" if mount_name else None
    view["readOnly"] = planned.read_only
    view["mountState"] = state
    return view


async def mounted_data_link_views(
    session: AsyncSession, studios: Sequence[Studio], envs: dict[str, ComputeEnv]
) -> dict[str, list[dict[str, Any]]]:
    """Per session id: its `mountedDataLinks` (see `_mount_view`)."""
    by_workspace = await load_links(session, studios)
    creds = await load_credentials(session, by_workspace)
    out: dict[str, list[dict[str, Any]]] = {}
    for studio in studios:
        status = studio.data_link_status or {}
        current = status.get("generation") == studio.generation
        reported = {str(m.get("dataLinkId")): m for m in (status.get("mounts") or []) if current}
        active = studio.status in ("starting", "running", "stopping")
        out[studio.session_id] = [
            _mount_view(
                planned,
                creds.get(planned.link.credentials_id or "") if planned.link else None,
                reported.get(planned.data_link_id) if active else None,
                active,
            )
            for planned in plan_mounts(
                studio.configuration,
                by_workspace.get(str(studio.workspace_id), {}),
                envs.get(studio.compute_env_id),
            )
        ]
    return out
