"""What the agent remembers about one session: its typed spec and its handle.

The controller's `SessionSpec` protobuf becomes a `SessionSpec` here once, at the start;
the runner, the runtime's `StartSpec` and the handle on disk all work from it. The
handle is persisted as JSON (`handle.json`) in the same shape older agents wrote, so
an upgraded agent re-adopts what its predecessor left running.

Credentials never reach this module: the data-links' keys travel in the desired
state's protobuf and are handed to the mounter straight from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from studios.agent.v1 import agent_pb2 as pb

from agent.datalinks import MountStatus
from agent.runtime import RuntimeHandle
from agent.state import ENDED_STATUSES, StateDir
from agent.volumes import VolumeInfo

__all__ = [
    "DataLinkSpec",
    "FileSystemMount",
    "ProgressStep",
    "SessionHandle",
    "SessionSpec",
    "load_handles",
    "save_handle",
]


@dataclass(frozen=True)
class DataLinkSpec:
    """A data-link as the handle keeps it: everything but its keys."""

    data_link_id: str
    mount_name: str
    resource_ref: str = ""
    read_only: bool = False
    endpoint: str = ""
    region: str = ""
    required: bool = False

    @classmethod
    def from_pb(cls, link: pb.DataLinkMount) -> DataLinkSpec:
        return cls(
            data_link_id=link.data_link_id,
            mount_name=link.mount_name,
            resource_ref=link.resource_ref,
            read_only=link.read_only,
            endpoint=link.endpoint,
            region=link.region,
            required=link.required,
        )


@dataclass(frozen=True)
class FileSystemMount:
    host_path: str
    mount_path: str
    read_only: bool = False


@dataclass(frozen=True)
class SessionSpec:
    """One session's configuration, from the controller's desired state."""

    image: str = ""
    tool: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    checkpoint_base_uri: str = ""
    boot_disk_size_gb: int = 0
    # The most this session's volume may grow to (GB); 0 = the whole budget.
    session_disk_cap_gb: int = 0
    studio_name: str = ""
    # Limits; 0 = none.
    cpu: int = 0
    memory_mib: int = 0
    gpu: int = 0
    data_links: tuple[DataLinkSpec, ...] = ()
    file_system_mounts: tuple[FileSystemMount, ...] = ()
    # A conda environment file built into an image derived from `image` (agent.images).
    conda_environment: str = ""

    @property
    def has_mounts(self) -> bool:
        return bool(self.data_links or self.file_system_mounts)

    @classmethod
    def from_pb(cls, spec: pb.SessionSpec) -> SessionSpec:
        return cls(
            image=spec.image,
            tool=spec.tool,
            environment=dict(spec.environment),
            checkpoint_base_uri=spec.checkpoint_base_uri,
            boot_disk_size_gb=spec.boot_disk_size_gb,
            session_disk_cap_gb=spec.session_disk_cap_gb,
            studio_name=spec.studio_name,
            cpu=spec.cpu,
            memory_mib=spec.memory_mib,
            gpu=spec.gpu,
            data_links=tuple(DataLinkSpec.from_pb(d) for d in spec.data_links),
            file_system_mounts=tuple(
                FileSystemMount(m.host_path, m.mount_path, m.read_only)
                for m in spec.file_system_mounts
            ),
            conda_environment=spec.conda_environment,
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["data_links"] = [asdict(d) for d in self.data_links]
        data["file_system_mounts"] = [asdict(m) for m in self.file_system_mounts]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionSpec:
        """Also reads what older agents wrote (no limits; missing keys are defaults)."""
        return cls(
            image=str(data.get("image") or ""),
            tool=str(data.get("tool") or ""),
            environment={str(k): str(v) for k, v in (data.get("environment") or {}).items()},
            checkpoint_base_uri=str(data.get("checkpoint_base_uri") or ""),
            boot_disk_size_gb=int(data.get("boot_disk_size_gb") or 0),
            session_disk_cap_gb=int(data.get("session_disk_cap_gb") or 0),
            studio_name=str(data.get("studio_name") or ""),
            cpu=int(data.get("cpu") or 0),
            memory_mib=int(data.get("memory_mib") or 0),
            gpu=int(data.get("gpu") or 0),
            data_links=tuple(
                DataLinkSpec(**_known(DataLinkSpec, d)) for d in data.get("data_links") or ()
            ),
            file_system_mounts=tuple(
                FileSystemMount(**_known(FileSystemMount, m))
                for m in data.get("file_system_mounts") or ()
            ),
            conda_environment=str(data.get("conda_environment") or ""),
        )


@dataclass
class ProgressStep:
    name: str
    # pending | in_progress | succeeded | errored
    status: str = "pending"
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    # -1 = no percentage for this step.
    percent: int = -1


def steps(*names: str) -> list[ProgressStep]:
    return [ProgressStep(n) for n in names]


@dataclass
class SessionHandle:
    """What the agent must remember about one session to recover it after a restart."""

    session_id: str
    generation: int
    # building | starting | running | stopping | stopped | errored | buildFailed
    status: str
    runtime: str
    spec: SessionSpec = field(default_factory=SessionSpec)
    restore_uri: str = ""
    message: str = ""
    pid: int = 0
    create_time: float = 0.0
    port: int = 0
    # What the proxy proves itself to the tool with (see `agent.proxy`); the state
    # directory holding handle.json is 0700.
    proxy_secret: str = ""
    root_dir: str = ""
    log_path: str = ""
    volume: VolumeInfo | None = None
    progress: list[ProgressStep] = field(default_factory=list)
    started_at: int = 0
    exited: bool = False
    exit_code: int = 0
    # True while the session directory holds data that no checkpoint has taken yet
    # (the final checkpoint failed); the directory is kept until one succeeds.
    unsaved: bool = False
    # URI of this run's newest checkpoint: the parent of the next (incremental) one.
    checkpoint_uri: str = ""
    # This run's final checkpoint, once its manifest is committed in the store. Saved
    # before the volume is released: a stop that finds it set never writes another final
    # checkpoint (the volume may be half released), it only finishes the release.
    final_uri: str = ""
    # Its key (CheckpointEvent.key), saved with it: the `stopped` report names it, and
    # the controller applies that status only once it has recorded this checkpoint. ""
    # in a handle an older agent wrote: that report names none (applied at once).
    final_key: str = ""
    # Opaque per-runtime data (Nomad's driver blob): the runtime's to read, not ours.
    runtime_data: dict[str, Any] = field(default_factory=dict)
    # One status per data-link of the spec, in its order.
    data_links: list[MountStatus] = field(default_factory=list)
    # The custom environment's build while it runs: its process group (pid and start
    # time), so that an agent restarted mid-build ends it before building again.
    build_pid: int = 0
    build_create_time: float = 0.0
    # The image this run's tool runs: the template's, or the one built for its
    # environment (operators see it in `studio-agent sessions`).
    image: str = ""
    # How the environment became an image (report.build_pb): env_hash, image, cached,
    # seconds, failed, log, log_truncated.
    build: dict[str, Any] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.status in ENDED_STATUSES

    @property
    def visible_root(self) -> str:
        """What the tool sees as /: the merged overlay for podman, else the volume."""
        return str(self.runtime_data.get("merged") or self.root_dir)

    def step(self, name: str) -> ProgressStep | None:
        return next((s for s in self.progress if s.name == name), None)

    def set_step(
        self, name: str, status: str, message: str = "", warnings: Sequence[str] = ()
    ) -> None:
        step = self.step(name)
        if step is not None:
            step.status, step.message, step.warnings = status, message, list(warnings)

    def runtime_handle(self) -> RuntimeHandle:
        return RuntimeHandle(
            session_id=self.session_id,
            pid=self.pid,
            create_time=self.create_time,
            port=self.port,
            root_dir=self.root_dir,
            log_path=self.log_path,
            data=dict(self.runtime_data),
        )

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["spec"] = self.spec.to_json()
        data["volume"] = self.volume.to_json() if self.volume else {}
        data["progress"] = [asdict(s) for s in self.progress]
        data["data_links"] = [s.to_json() for s in self.data_links]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionHandle:
        fields = _known(cls, data)
        fields["spec"] = SessionSpec.from_json(data.get("spec") or {})
        fields["volume"] = VolumeInfo.from_json(data["volume"]) if data.get("volume") else None
        fields["progress"] = [
            ProgressStep(**_known(ProgressStep, s)) for s in data.get("progress") or ()
        ]
        fields["data_links"] = [MountStatus.from_json(s) for s in data.get("data_links") or ()]
        return cls(**fields)


def _known(cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """The fields `cls` has: a newer agent's extra keys are ignored, not fatal."""
    return {k: v for k, v in data.items() if k in cls.__dataclass_fields__}


def save_handle(state: StateDir, h: SessionHandle) -> None:
    state.save_handle_json(h.session_id, h.to_json())


def load_handles(state: StateDir) -> list[SessionHandle]:
    return [SessionHandle.from_json(data) for data in state.load_handle_jsons()]
