"""What a session mounts: data-links (buckets) and file-system mounts.

Data-links: the entries of a studio's `configuration.mountDataV2` (then the
deprecated `mountData` ids), in that order, each once. Each becomes a
`DataLinkMountSpec` (sent to the agent by `controller.desired`) at
`/workspace/data/<mount name>`:

- mount name: the data-link's name in lower case, every character outside
  ``[a-z0-9._-]`` replaced by ``-``, leading ``.``, ``_`` and ``-`` dropped
  (so never ``.``, ``..``, hidden or option-like; ``data-link`` if nothing is
  left), at most 120 characters; a name already taken in the same studio gets
  ``-2``, ``-3``, ... in the order of the configuration (deterministic).
- read-only unless the bucket (or a prefix holding the data-link) is in the
  compute environment's `allowedBuckets` ("s3://bucket", "bucket",
  "s3://bucket/prefix").
- `required` is false: a mount that fails does not fail the start; the session
  runs without it and the studio's `mountedDataLinks` (and status message) say
  why. A deleted data-link is skipped the same way at the next start; a running
  session keeps what it mounted until it stops (the agent reads the spec when
  a generation starts).

File-system mounts (`ComputeEnv.file_system_mounts`): absolute host and mount
paths without ``..``; a mount path may not be the work directory, contain it
(checkpoints could not be saved), or lie inside the data-link directory.
"""

from __future__ import annotations

import ipaddress
import logging
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.errors import BadRequest
from controller.models import ComputeEnv, Credentials, DataLink, Studio
from controller.requests import DataStudioConfiguration, FileSystemMountBody
from controller.secret_box import SecretError, box_for

__all__ = [
    "DATA_DIR",
    "MOUNT_REQUIRED",
    "WORK_DIR",
    "DataLinkMountSpec",
    "FileSystemMountSpec",
    "PlannedMount",
    "StudioMount",
    "bucket_allowed",
    "check_mount_data",
    "data_link_mounts",
    "file_system_mount_specs",
    "mount_entries",
    "mount_names",
    "normalize_resource_ref",
    "parse_allowed_bucket",
    "plan_mounts",
    "split_resource_ref",
    "studio_mounts",
    "validate_allowed_buckets",
    "validate_file_system_mounts",
    "validate_sub_path",
]

log = logging.getLogger(__name__)

WORK_DIR = "/workspace"
DATA_DIR = "/workspace/data"
# A failed mount does not fail the start (see the module docstring).
MOUNT_REQUIRED = False

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_NAME_CHAR = re.compile(r"[^a-z0-9._-]")
# Agents accept mount names of up to 128 characters; room for a "-<n>" suffix.
_MAX_NAME = 120
_FORBIDDEN = ("\x00", "\n", "\r", "\\")
# Mount paths that would break the container.
_SYSTEM_DIRS = ("/proc", "/sys", "/dev")


# ------------------------------------------------------------ resource references


def _check_chars(text: str, field: str) -> None:
    for char in _FORBIDDEN:
        if char in text:
            raise BadRequest(f"{field}: must not contain {char!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise BadRequest(f"{field}: must not contain control characters")


def _check_segments(segments: Sequence[str], field: str, text: str) -> None:
    for segment in segments:
        if segment == "":
            raise BadRequest(f"{field}: empty path segment ('//') in {text!r}")
        if segment in (".", ".."):
            raise BadRequest(f"{field}: '{segment}' is not allowed as a path segment")


def _check_bucket(bucket: str, field: str) -> None:
    if not _BUCKET.match(bucket):
        raise BadRequest(
            f"{field}: invalid bucket name {bucket!r}: 3 to 63 lower-case letters, digits, "
            "dots and hyphens, beginning and ending with a letter or digit"
        )
    if ".." in bucket:
        raise BadRequest(f"{field}: invalid bucket name {bucket!r}: two adjacent dots")
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        return
    raise BadRequest(f"{field}: invalid bucket name {bucket!r}: looks like an IP address")


def split_resource_ref(ref: str) -> tuple[str, str]:
    """(bucket, prefix) of a normalised "s3://bucket[/prefix]" (no validation)."""
    rest = ref[len("s3://") :] if ref.startswith("s3://") else ref
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix


def normalize_resource_ref(text: str, field: str = "resourceRef") -> str:
    """``s3://bucket`` or ``s3://bucket/sub/dir`` (one trailing slash dropped); else 400."""
    _check_chars(text, field)
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise BadRequest(f"{field}: expected s3://bucket or s3://bucket/path, got {text!r}")
    if scheme != "s3":
        raise BadRequest(f"{field}: scheme must be 's3' (S3 or S3-compatible), got {scheme!r}")
    if rest.endswith("/"):
        rest = rest[:-1]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise BadRequest(f"{field}: bucket name missing in {text!r}")
    _check_bucket(bucket, field)
    if "/" in rest:
        _check_segments(prefix.split("/"), field, text)
    if len(prefix.encode()) > 1024:
        raise BadRequest(f"{field}: the path is longer than 1024 bytes")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def validate_sub_path(path: str, field: str) -> str:
    """A relative sub-directory of a data-link (MountData.path), normalised."""
    _check_chars(path, field)
    cleaned = path.strip("/")
    if path.startswith("/"):
        raise BadRequest(f"{field}: must be relative to the data-link, got {path!r}")
    if not cleaned:
        return ""
    _check_segments(cleaned.split("/"), field, path)
    return cleaned


def parse_allowed_bucket(entry: str) -> tuple[str, str] | None:
    """(bucket, prefix) of an allowedBuckets entry ("s3://b", "b", "s3://b/p"); None if invalid."""
    text = entry.strip()
    if not text.startswith("s3://"):
        text = "s3://" + text
    try:
        return split_resource_ref(normalize_resource_ref(text))
    except BadRequest:
        return None


def validate_allowed_buckets(entries: Sequence[str]) -> list[str]:
    """allowedBuckets as given, each checked; 400 naming an invalid entry."""
    for n, entry in enumerate(entries):
        if parse_allowed_bucket(entry) is None:
            text = entry if entry.startswith("s3://") else "s3://" + entry
            normalize_resource_ref(text, f"config.allowedBuckets.{n}")  # raises with the reason
    return list(entries)


def bucket_allowed(ref: str, allowed: Iterable[str]) -> bool:
    """True when `ref` lies in one of the compute environment's allowed buckets (or prefixes)."""
    bucket, prefix = split_resource_ref(ref)
    for entry in allowed:
        parsed = parse_allowed_bucket(str(entry))
        if parsed is None or parsed[0] != bucket:
            continue
        if not parsed[1] or prefix == parsed[1] or prefix.startswith(parsed[1] + "/"):
            return True
    return False


# ------------------------------------------------------------ mount names and plans


def _mount_name(name: str) -> str:
    cleaned = _NAME_CHAR.sub("-", name.lower())
    # A leading letter or digit: never ".", "..", a hidden directory, or
    # something a mount helper's command line could take for an option.
    cleaned = cleaned.lstrip("._-")[:_MAX_NAME]
    return cleaned or "data-link"


def mount_names(names: Iterable[str]) -> list[str]:
    """Directory names below /workspace/data, unique in order (see the module docstring)."""
    taken: set[str] = set()
    out = []
    for name in names:
        base = _mount_name(name)
        candidate, n = base, 1
        while candidate in taken:
            n += 1
            candidate = f"{base}-{n}"
        taken.add(candidate)
        out.append(candidate)
    return out


def mount_entries(configuration: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(dataLinkId, sub-path) of a stored configuration, in order, each id once."""
    configuration = configuration or {}
    seen: dict[str, str] = {}
    for mount in configuration.get("mountDataV2") or []:
        if isinstance(mount, dict) and mount.get("dataLinkId"):
            seen.setdefault(str(mount["dataLinkId"]), str(mount.get("path") or ""))
    for link_id in configuration.get("mountData") or []:
        if link_id:
            seen.setdefault(str(link_id), "")
    return list(seen.items())


@dataclass(frozen=True, slots=True)
class PlannedMount:
    data_link_id: str
    link: DataLink | None
    # None for a data-link that no longer exists (skipped).
    mount_name: str | None
    resource_ref: str
    read_only: bool

    @property
    def problem(self) -> str | None:
        if self.link is None:
            return f"data-link {self.data_link_id} no longer exists"
        return None


def plan_mounts(
    configuration: dict[str, Any] | None,
    links: dict[str, DataLink],
    env: ComputeEnv | None,
) -> list[PlannedMount]:
    entries = mount_entries(configuration)
    present = [(i, p) for i, p in entries if i in links]
    names = iter(mount_names(links[i].name for i, _ in present))
    allowed = list(env.allowed_buckets or []) if env is not None else []
    out = []
    for link_id, path in entries:
        link = links.get(link_id)
        if link is None:
            out.append(PlannedMount(link_id, None, None, "", True))
            continue
        path = path.strip("/")  # validated at create/update/start (validate_sub_path)
        ref = f"{link.resource_ref}/{path}" if path else link.resource_ref
        out.append(PlannedMount(link_id, link, next(names), ref, not bucket_allowed(ref, allowed)))
    return out


async def load_links(
    session: AsyncSession, studios: Iterable[Studio]
) -> dict[str, dict[str, DataLink]]:
    """Per workspace id: its data-links that the studios' configurations name."""
    studios = list(studios)
    ids = {i for s in studios for i, _ in mount_entries(s.configuration)}
    if not ids:
        return {}
    out: dict[str, dict[str, DataLink]] = {}
    for link in (await session.scalars(select(DataLink).where(DataLink.id.in_(ids)))).all():
        out.setdefault(str(link.workspace_id), {})[link.id] = link
    return out


async def load_credentials(
    session: AsyncSession, by_workspace: dict[str, dict[str, DataLink]]
) -> dict[str, Credentials]:
    """The credentials the data-links of `load_links` use, by id."""
    wanted = {
        link.credentials_id
        for links in by_workspace.values()
        for link in links.values()
        if link.credentials_id
    }
    if not wanted:
        return {}
    rows = await session.scalars(select(Credentials).where(Credentials.id.in_(wanted)))
    return {c.id: c for c in rows.all()}


@dataclass(frozen=True, slots=True)
class StudioMount:
    """A data-link of a studio's configuration: the plan, and how the current run mounted it."""

    planned: PlannedMount
    credentials: Credentials | None
    # The agent's report of the current generation; None unless the session is active.
    reported: dict[str, Any] | None
    # Starting, running or stopping: a mount the agent made may still be in place.
    active: bool

    @property
    def state(self) -> str | None:
        """What the agent reports: "mounted", "read-only", "failed", "unmounted", or None."""
        return self.reported.get("state") if self.reported else None

    @property
    def mount_name(self) -> str | None:
        return self.planned.mount_name or (
            self.reported.get("mountName") if self.reported else None
        )

    @property
    def problem(self) -> str | None:
        """Why the session runs (or will run) without this data-link; None when it is fine."""
        message = self.planned.problem
        if message and self.active and self.state in ("mounted", "read-only"):
            message += "; the running session keeps its mount until it stops"
        if self.state == "failed":
            message = (self.reported or {}).get("message") or "the mount failed"
        return message


async def studio_mounts(
    session: AsyncSession, studios: Sequence[Studio], envs: dict[str, ComputeEnv]
) -> dict[str, list[StudioMount]]:
    """Per session id: its data-links in configuration order (see `StudioMount`)."""
    by_workspace = await load_links(session, studios)
    creds = await load_credentials(session, by_workspace)
    out: dict[str, list[StudioMount]] = {}
    for studio in studios:
        status = studio.data_link_status or {}
        current = status.get("generation") == studio.generation
        reported = {str(m.get("dataLinkId")): m for m in (status.get("mounts") or []) if current}
        active = studio.status in ("starting", "running", "stopping")
        out[studio.session_id] = [
            StudioMount(
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


@dataclass(frozen=True, slots=True)
class DataLinkMountSpec:
    """A data-link mount an agent is to make; "" where there is nothing to say."""

    data_link_id: str
    mount_name: str
    resource_ref: str
    read_only: bool
    region: str
    # The S3-compatible store's endpoint ("" for AWS itself).
    endpoint: str
    # Kept out of the repr: a logged spec must not carry the keys.
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    required: bool = MOUNT_REQUIRED


async def data_link_mounts(
    session: AsyncSession, studios: Iterable[Studio], envs: dict[str, ComputeEnv]
) -> dict[str, list[DataLinkMountSpec]]:
    """The data-link mounts of the studios to be run, credentials decrypted.

    Only studios the agent is to run get them: the keys travel no further
    than needed. Another workspace's data-link is never mounted.
    """
    running = [s for s in studios if s.desired_status == "running" and not s.deleted]
    by_workspace = await load_links(session, running)
    creds = await load_credentials(session, by_workspace)
    box = box_for(session)
    out: dict[str, list[DataLinkMountSpec]] = {}
    for studio in running:
        links = by_workspace.get(str(studio.workspace_id), {})
        mounts = []
        for planned in plan_mounts(studio.configuration, links, envs.get(studio.compute_env_id)):
            if planned.link is None or planned.mount_name is None:
                continue
            region = planned.link.region or ""
            endpoint = access_key_id = secret_access_key = ""
            cred = creds.get(planned.link.credentials_id or "")
            if cred is not None:
                endpoint = cred.base_url or ""
                region = region or cred.region or ""
                access_key_id, secret_access_key = _keys(cred, box)
            mounts.append(
                DataLinkMountSpec(
                    data_link_id=planned.data_link_id,
                    mount_name=planned.mount_name,
                    resource_ref=planned.resource_ref,
                    read_only=planned.read_only,
                    region=region,
                    endpoint=endpoint,
                    access_key_id=access_key_id,
                    secret_access_key=secret_access_key,
                    required=MOUNT_REQUIRED,
                )
            )
        out[studio.session_id] = mounts
    return out


def _keys(cred: Credentials, box: Any) -> tuple[str, str]:
    """(access key id, secret access key); empty when they cannot be decrypted."""
    if box is None:
        log.error("no credentials key registered: data-link %s mounts without keys", cred.id)
        return "", ""
    try:
        keys = box.open(cred.secret, cred.id)
    except SecretError as exc:
        # The agent's mount then fails and reports it; the key file is the fix.
        log.error("credentials %s: %s", cred.id, exc)
        return "", ""
    return str(keys.get("accessKey", "")), str(keys.get("secretKey", ""))


# ------------------------------------------------------------ file-system mounts


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _absolute(text: str, field: str) -> str:
    _check_chars(text, field)
    if not text.startswith("/"):
        raise BadRequest(f"{field}: must be an absolute path, got {text!r}")
    if ".." in text.split("/"):
        raise BadRequest(f"{field}: must not contain '..'")
    normalised = posixpath.normpath(text)
    return "/" + normalised.lstrip("/")


def validate_file_system_mounts(mounts: Sequence[FileSystemMountBody]) -> list[dict[str, Any]]:
    """The stored form of compute-environment file-system mounts; 400 naming the problem."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, mount in enumerate(mounts):
        field = f"config.fileSystemMounts.{n}"
        host = _absolute(mount.host_path, f"{field}.hostPath")
        target = _absolute(mount.mount_path, f"{field}.mountPath")
        if _inside(WORK_DIR, target):
            raise BadRequest(
                f"{field}.mountPath: {target} is or contains the work directory {WORK_DIR}: "
                "the session's checkpoints could not be saved"
            )
        if _inside(target, DATA_DIR):
            raise BadRequest(
                f"{field}.mountPath: {target} is inside {DATA_DIR}, where data-links are mounted"
            )
        if any(_inside(target, d) for d in _SYSTEM_DIRS):
            raise BadRequest(f"{field}.mountPath: {target} is a system directory")
        if target in seen:
            raise BadRequest(f"{field}.mountPath: {target} is mounted twice")
        seen.add(target)
        out.append({"hostPath": host, "mountPath": target, "readOnly": mount.read_only})
    return out


@dataclass(frozen=True, slots=True)
class FileSystemMountSpec:
    host_path: str
    mount_path: str
    read_only: bool


def file_system_mount_specs(env: ComputeEnv | None) -> list[FileSystemMountSpec]:
    if env is None:
        return []
    return [
        FileSystemMountSpec(
            host_path=str(m["hostPath"]),
            mount_path=str(m["mountPath"]),
            read_only=bool(m.get("readOnly", False)),
        )
        for m in env.file_system_mounts or []
        # Entries of the old free-form list (strings) are not mounts.
        if isinstance(m, dict) and m.get("hostPath") and m.get("mountPath")
    ]
