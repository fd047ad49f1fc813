"""Data-links in the API's shapes: DataLinkDto, and the `mountedDataLinks` of a studio's view.

`mountedDataLinks`: one entry per data-link of the configuration, in order:
a DataLinkDto (the reference's shape) plus `mountName`, `mountPath`,
`readOnly` and `mountState` (what the agent reports for the current run:
"mounted", "read-only", "failed", "unmounted"; absent before it reports), the
name and path absent when the data-link is gone. `status` is INVALID
with a `message` when the data-link no longer exists or its mount failed
(`controller.mounts.StudioMount` decides which).
"""

from __future__ import annotations

from typing import Any

from controller.models import Credentials, DataLink
from controller.mounts import DATA_DIR, StudioMount
from controller.responses import DataLinkCredentialsDto, DataLinkDto

__all__ = ["data_link_dto", "mounted_data_link_view"]


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


def mounted_data_link_view(mount: StudioMount) -> dict[str, Any]:
    """One entry of a studio's `mountedDataLinks`: a DataLinkDto plus where and how it mounts."""
    planned = mount.planned
    mount_name = mount.mount_name
    if planned.link is not None:
        view = data_link_dto(planned.link, mount.credentials).dump()
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
    message = mount.problem
    view["status"] = "INVALID" if message else "VALID"
    if message:
        view["message"] = message
    # Absent rather than null while unknown: no name when the data-link is gone, no
    # state before the agent reports (issue 14: a field without a value is omitted).
    if mount_name:
        view["mountName"] = mount_name
        view["mountPath"] = f"{DATA_DIR}/{mount_name}"
    view["readOnly"] = planned.read_only
    if mount.state is not None:
        view["mountState"] = mount.state
    return view
