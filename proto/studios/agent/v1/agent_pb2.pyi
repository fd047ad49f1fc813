from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProtocolVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_VERSION_UNSPECIFIED: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_V1: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_V2: _ClassVar[ProtocolVersion]

class RuntimeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUNTIME_KIND_UNSPECIFIED: _ClassVar[RuntimeKind]
    RUNTIME_KIND_LOCAL: _ClassVar[RuntimeKind]
    RUNTIME_KIND_PODMAN: _ClassVar[RuntimeKind]

class DrainMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DRAIN_MODE_NONE: _ClassVar[DrainMode]
    DRAIN_MODE_STOP: _ClassVar[DrainMode]
    DRAIN_MODE_WAIT: _ClassVar[DrainMode]

class SessionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATUS_UNSPECIFIED: _ClassVar[SessionStatus]
    SESSION_STATUS_STARTING: _ClassVar[SessionStatus]
    SESSION_STATUS_RUNNING: _ClassVar[SessionStatus]
    SESSION_STATUS_STOPPING: _ClassVar[SessionStatus]
    SESSION_STATUS_STOPPED: _ClassVar[SessionStatus]
    SESSION_STATUS_ERRORED: _ClassVar[SessionStatus]
    SESSION_STATUS_BUILDING: _ClassVar[SessionStatus]
    SESSION_STATUS_BUILD_FAILED: _ClassVar[SessionStatus]

class StepStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_STATUS_UNSPECIFIED: _ClassVar[StepStatus]
    STEP_STATUS_PENDING: _ClassVar[StepStatus]
    STEP_STATUS_IN_PROGRESS: _ClassVar[StepStatus]
    STEP_STATUS_SUCCEEDED: _ClassVar[StepStatus]
    STEP_STATUS_ERRORED: _ClassVar[StepStatus]

class VolumeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VOLUME_KIND_UNSPECIFIED: _ClassVar[VolumeKind]
    VOLUME_KIND_DIRECTORY: _ClassVar[VolumeKind]
    VOLUME_KIND_XFS_LOOP: _ClassVar[VolumeKind]

class DataLinkMountState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_LINK_MOUNT_STATE_UNSPECIFIED: _ClassVar[DataLinkMountState]
    DATA_LINK_MOUNT_STATE_MOUNTED: _ClassVar[DataLinkMountState]
    DATA_LINK_MOUNT_STATE_READ_ONLY: _ClassVar[DataLinkMountState]
    DATA_LINK_MOUNT_STATE_FAILED: _ClassVar[DataLinkMountState]
    DATA_LINK_MOUNT_STATE_UNMOUNTED: _ClassVar[DataLinkMountState]

class CheckpointStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKPOINT_STATUS_UNSPECIFIED: _ClassVar[CheckpointStatus]
    CHECKPOINT_STATUS_EMPTY: _ClassVar[CheckpointStatus]
    CHECKPOINT_STATUS_INTERIM: _ClassVar[CheckpointStatus]
    CHECKPOINT_STATUS_FINALIZED: _ClassVar[CheckpointStatus]
    CHECKPOINT_STATUS_INVALID: _ClassVar[CheckpointStatus]

class CheckpointAckResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKPOINT_ACK_RESULT_UNSPECIFIED: _ClassVar[CheckpointAckResult]
    CHECKPOINT_ACK_RESULT_RECORDED: _ClassVar[CheckpointAckResult]
    CHECKPOINT_ACK_RESULT_SUPERSEDED: _ClassVar[CheckpointAckResult]
    CHECKPOINT_ACK_RESULT_REFUSED: _ClassVar[CheckpointAckResult]

class DesiredStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DESIRED_STATUS_UNSPECIFIED: _ClassVar[DesiredStatus]
    DESIRED_STATUS_RUNNING: _ClassVar[DesiredStatus]
    DESIRED_STATUS_STOPPED: _ClassVar[DesiredStatus]
    DESIRED_STATUS_DELETED: _ClassVar[DesiredStatus]
PROTOCOL_VERSION_UNSPECIFIED: ProtocolVersion
PROTOCOL_VERSION_V1: ProtocolVersion
PROTOCOL_VERSION_V2: ProtocolVersion
RUNTIME_KIND_UNSPECIFIED: RuntimeKind
RUNTIME_KIND_LOCAL: RuntimeKind
RUNTIME_KIND_PODMAN: RuntimeKind
DRAIN_MODE_NONE: DrainMode
DRAIN_MODE_STOP: DrainMode
DRAIN_MODE_WAIT: DrainMode
SESSION_STATUS_UNSPECIFIED: SessionStatus
SESSION_STATUS_STARTING: SessionStatus
SESSION_STATUS_RUNNING: SessionStatus
SESSION_STATUS_STOPPING: SessionStatus
SESSION_STATUS_STOPPED: SessionStatus
SESSION_STATUS_ERRORED: SessionStatus
SESSION_STATUS_BUILDING: SessionStatus
SESSION_STATUS_BUILD_FAILED: SessionStatus
STEP_STATUS_UNSPECIFIED: StepStatus
STEP_STATUS_PENDING: StepStatus
STEP_STATUS_IN_PROGRESS: StepStatus
STEP_STATUS_SUCCEEDED: StepStatus
STEP_STATUS_ERRORED: StepStatus
VOLUME_KIND_UNSPECIFIED: VolumeKind
VOLUME_KIND_DIRECTORY: VolumeKind
VOLUME_KIND_XFS_LOOP: VolumeKind
DATA_LINK_MOUNT_STATE_UNSPECIFIED: DataLinkMountState
DATA_LINK_MOUNT_STATE_MOUNTED: DataLinkMountState
DATA_LINK_MOUNT_STATE_READ_ONLY: DataLinkMountState
DATA_LINK_MOUNT_STATE_FAILED: DataLinkMountState
DATA_LINK_MOUNT_STATE_UNMOUNTED: DataLinkMountState
CHECKPOINT_STATUS_UNSPECIFIED: CheckpointStatus
CHECKPOINT_STATUS_EMPTY: CheckpointStatus
CHECKPOINT_STATUS_INTERIM: CheckpointStatus
CHECKPOINT_STATUS_FINALIZED: CheckpointStatus
CHECKPOINT_STATUS_INVALID: CheckpointStatus
CHECKPOINT_ACK_RESULT_UNSPECIFIED: CheckpointAckResult
CHECKPOINT_ACK_RESULT_RECORDED: CheckpointAckResult
CHECKPOINT_ACK_RESULT_SUPERSEDED: CheckpointAckResult
CHECKPOINT_ACK_RESULT_REFUSED: CheckpointAckResult
DESIRED_STATUS_UNSPECIFIED: DesiredStatus
DESIRED_STATUS_RUNNING: DesiredStatus
DESIRED_STATUS_STOPPED: DesiredStatus
DESIRED_STATUS_DELETED: DesiredStatus

class EndpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndpointsResponse(_message.Message):
    __slots__ = ("agent_endpoint", "server_names")
    AGENT_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SERVER_NAMES_FIELD_NUMBER: _ClassVar[int]
    agent_endpoint: str
    server_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_endpoint: _Optional[str] = ..., server_names: _Optional[_Iterable[str]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("agent_id", "compute_env_id", "csr_pem", "hostname", "capacity")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_ENV_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    compute_env_id: str
    csr_pem: bytes
    hostname: str
    capacity: HostCapacity
    def __init__(self, agent_id: _Optional[str] = ..., compute_env_id: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., hostname: _Optional[str] = ..., capacity: _Optional[_Union[HostCapacity, _Mapping]] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("agent_id", "certificate_pem", "ca_certificate_pem", "not_after")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    certificate_pem: bytes
    ca_certificate_pem: bytes
    not_after: int
    def __init__(self, agent_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., ca_certificate_pem: _Optional[bytes] = ..., not_after: _Optional[int] = ...) -> None: ...

class RenewCertificateRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ...) -> None: ...

class RenewCertificateResponse(_message.Message):
    __slots__ = ("certificate_pem", "not_after")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    not_after: int
    def __init__(self, certificate_pem: _Optional[bytes] = ..., not_after: _Optional[int] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("hello", "inventory", "session", "checkpoint", "capacity", "heartbeat", "connections", "visit")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    VISIT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    inventory: Inventory
    session: SessionObserved
    checkpoint: CheckpointEvent
    capacity: HostCapacity
    heartbeat: Heartbeat
    connections: SessionConnections
    visit: ConnectionVisit
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., inventory: _Optional[_Union[Inventory, _Mapping]] = ..., session: _Optional[_Union[SessionObserved, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointEvent, _Mapping]] = ..., capacity: _Optional[_Union[HostCapacity, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., connections: _Optional[_Union[SessionConnections, _Mapping]] = ..., visit: _Optional[_Union[ConnectionVisit, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "agent_id", "hostname", "compute_env_id", "proxy_url", "agent_version", "capacity", "runtime_kind", "proxy_instance_id", "drain")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_ENV_ID_FIELD_NUMBER: _ClassVar[int]
    PROXY_URL_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_KIND_FIELD_NUMBER: _ClassVar[int]
    PROXY_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    protocol_version: ProtocolVersion
    agent_id: str
    hostname: str
    compute_env_id: str
    proxy_url: str
    agent_version: str
    capacity: HostCapacity
    runtime_kind: RuntimeKind
    proxy_instance_id: str
    drain: DrainMode
    def __init__(self, protocol_version: _Optional[_Union[ProtocolVersion, str]] = ..., agent_id: _Optional[str] = ..., hostname: _Optional[str] = ..., compute_env_id: _Optional[str] = ..., proxy_url: _Optional[str] = ..., agent_version: _Optional[str] = ..., capacity: _Optional[_Union[HostCapacity, _Mapping]] = ..., runtime_kind: _Optional[_Union[RuntimeKind, str]] = ..., proxy_instance_id: _Optional[str] = ..., drain: _Optional[_Union[DrainMode, str]] = ...) -> None: ...

class Inventory(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionObserved]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionObserved, _Mapping]]] = ...) -> None: ...

class ProgressStep(_message.Message):
    __slots__ = ("name", "status", "message", "warnings", "percent")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: StepStatus
    message: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    percent: int
    def __init__(self, name: _Optional[str] = ..., status: _Optional[_Union[StepStatus, str]] = ..., message: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., percent: _Optional[int] = ...) -> None: ...

class Volume(_message.Message):
    __slots__ = ("path", "size_bytes", "used_bytes", "volume_kind")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOLUME_KIND_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    used_bytes: int
    volume_kind: VolumeKind
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., volume_kind: _Optional[_Union[VolumeKind, str]] = ...) -> None: ...

class SessionObserved(_message.Message):
    __slots__ = ("session_id", "generation", "status", "message", "runtime", "tool_port", "root_dir", "volume", "progress", "started_at", "exited", "exit_code", "data_links", "build", "final_checkpoint_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    TOOL_PORT_FIELD_NUMBER: _ClassVar[int]
    ROOT_DIR_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    DATA_LINKS_FIELD_NUMBER: _ClassVar[int]
    BUILD_FIELD_NUMBER: _ClassVar[int]
    FINAL_CHECKPOINT_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    generation: int
    status: SessionStatus
    message: str
    runtime: str
    tool_port: int
    root_dir: str
    volume: Volume
    progress: _containers.RepeatedCompositeFieldContainer[ProgressStep]
    started_at: int
    exited: bool
    exit_code: int
    data_links: _containers.RepeatedCompositeFieldContainer[DataLinkMountStatus]
    build: EnvironmentBuild
    final_checkpoint_key: str
    def __init__(self, session_id: _Optional[str] = ..., generation: _Optional[int] = ..., status: _Optional[_Union[SessionStatus, str]] = ..., message: _Optional[str] = ..., runtime: _Optional[str] = ..., tool_port: _Optional[int] = ..., root_dir: _Optional[str] = ..., volume: _Optional[_Union[Volume, _Mapping]] = ..., progress: _Optional[_Iterable[_Union[ProgressStep, _Mapping]]] = ..., started_at: _Optional[int] = ..., exited: _Optional[bool] = ..., exit_code: _Optional[int] = ..., data_links: _Optional[_Iterable[_Union[DataLinkMountStatus, _Mapping]]] = ..., build: _Optional[_Union[EnvironmentBuild, _Mapping]] = ..., final_checkpoint_key: _Optional[str] = ...) -> None: ...

class EnvironmentBuild(_message.Message):
    __slots__ = ("env_hash", "image", "cached", "seconds", "failed", "log", "log_truncated")
    ENV_HASH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    LOG_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    env_hash: str
    image: str
    cached: bool
    seconds: float
    failed: bool
    log: str
    log_truncated: bool
    def __init__(self, env_hash: _Optional[str] = ..., image: _Optional[str] = ..., cached: _Optional[bool] = ..., seconds: _Optional[float] = ..., failed: _Optional[bool] = ..., log: _Optional[str] = ..., log_truncated: _Optional[bool] = ...) -> None: ...

class DataLinkMountStatus(_message.Message):
    __slots__ = ("data_link_id", "mount_name", "message", "mount_state")
    DATA_LINK_ID_FIELD_NUMBER: _ClassVar[int]
    MOUNT_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MOUNT_STATE_FIELD_NUMBER: _ClassVar[int]
    data_link_id: str
    mount_name: str
    message: str
    mount_state: DataLinkMountState
    def __init__(self, data_link_id: _Optional[str] = ..., mount_name: _Optional[str] = ..., message: _Optional[str] = ..., mount_state: _Optional[_Union[DataLinkMountState, str]] = ...) -> None: ...

class ActiveConnection(_message.Message):
    __slots__ = ("user_id", "user_name", "connections", "last_active")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USER_NAME_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    user_name: str
    connections: int
    last_active: int
    def __init__(self, user_id: _Optional[int] = ..., user_name: _Optional[str] = ..., connections: _Optional[int] = ..., last_active: _Optional[int] = ...) -> None: ...

class SessionConnections(_message.Message):
    __slots__ = ("session_id", "connections")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    connections: _containers.RepeatedCompositeFieldContainer[ActiveConnection]
    def __init__(self, session_id: _Optional[str] = ..., connections: _Optional[_Iterable[_Union[ActiveConnection, _Mapping]]] = ...) -> None: ...

class ConnectionVisit(_message.Message):
    __slots__ = ("visit_id", "session_id", "user_id", "user_name", "client_address", "opened_at_ms", "closed_at_ms", "proxy_instance_id")
    VISIT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    USER_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OPENED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    PROXY_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    visit_id: str
    session_id: str
    user_id: int
    user_name: str
    client_address: str
    opened_at_ms: int
    closed_at_ms: int
    proxy_instance_id: str
    def __init__(self, visit_id: _Optional[str] = ..., session_id: _Optional[str] = ..., user_id: _Optional[int] = ..., user_name: _Optional[str] = ..., client_address: _Optional[str] = ..., opened_at_ms: _Optional[int] = ..., closed_at_ms: _Optional[int] = ..., proxy_instance_id: _Optional[str] = ...) -> None: ...

class CheckpointEvent(_message.Message):
    __slots__ = ("session_id", "generation", "key", "uri", "status", "size_bytes", "saved_at")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SAVED_AT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    generation: int
    key: str
    uri: str
    status: CheckpointStatus
    size_bytes: int
    saved_at: int
    def __init__(self, session_id: _Optional[str] = ..., generation: _Optional[int] = ..., key: _Optional[str] = ..., uri: _Optional[str] = ..., status: _Optional[_Union[CheckpointStatus, str]] = ..., size_bytes: _Optional[int] = ..., saved_at: _Optional[int] = ...) -> None: ...

class HostCapacity(_message.Message):
    __slots__ = ("cpus", "memory_bytes", "memory_available_bytes", "disk_free_bytes", "disk_budget_free_bytes")
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BUDGET_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpus: int
    memory_bytes: int
    memory_available_bytes: int
    disk_free_bytes: int
    disk_budget_free_bytes: int
    def __init__(self, cpus: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., disk_free_bytes: _Optional[int] = ..., disk_budget_free_bytes: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_at", "drain")
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    sent_at: int
    drain: DrainMode
    def __init__(self, sent_at: _Optional[int] = ..., drain: _Optional[_Union[DrainMode, str]] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("welcome", "desired", "checkpoint_ack", "visit_ack")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ACK_FIELD_NUMBER: _ClassVar[int]
    VISIT_ACK_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    desired: DesiredState
    checkpoint_ack: CheckpointAck
    visit_ack: ConnectionVisitAck
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., desired: _Optional[_Union[DesiredState, _Mapping]] = ..., checkpoint_ack: _Optional[_Union[CheckpointAck, _Mapping]] = ..., visit_ack: _Optional[_Union[ConnectionVisitAck, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("protocol_version", "agent_id", "heartbeat_interval_seconds", "connect_token_key", "checkpoint_acks", "connect_cookie_max_seconds", "connection_visits")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONNECT_TOKEN_KEY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ACKS_FIELD_NUMBER: _ClassVar[int]
    CONNECT_COOKIE_MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_VISITS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: ProtocolVersion
    agent_id: str
    heartbeat_interval_seconds: int
    connect_token_key: bytes
    checkpoint_acks: bool
    connect_cookie_max_seconds: int
    connection_visits: bool
    def __init__(self, protocol_version: _Optional[_Union[ProtocolVersion, str]] = ..., agent_id: _Optional[str] = ..., heartbeat_interval_seconds: _Optional[int] = ..., connect_token_key: _Optional[bytes] = ..., checkpoint_acks: _Optional[bool] = ..., connect_cookie_max_seconds: _Optional[int] = ..., connection_visits: _Optional[bool] = ...) -> None: ...

class CheckpointAck(_message.Message):
    __slots__ = ("session_id", "key", "generation", "result", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    key: str
    generation: int
    result: CheckpointAckResult
    message: str
    def __init__(self, session_id: _Optional[str] = ..., key: _Optional[str] = ..., generation: _Optional[int] = ..., result: _Optional[_Union[CheckpointAckResult, str]] = ..., message: _Optional[str] = ...) -> None: ...

class ConnectionVisitAck(_message.Message):
    __slots__ = ("visit_id", "closed_at_ms", "refused", "message")
    VISIT_ID_FIELD_NUMBER: _ClassVar[int]
    CLOSED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    visit_id: str
    closed_at_ms: int
    refused: bool
    message: str
    def __init__(self, visit_id: _Optional[str] = ..., closed_at_ms: _Optional[int] = ..., refused: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class CheckpointRef(_message.Message):
    __slots__ = ("checkpoint_id", "uri")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: int
    uri: str
    def __init__(self, checkpoint_id: _Optional[int] = ..., uri: _Optional[str] = ...) -> None: ...

class SessionSpec(_message.Message):
    __slots__ = ("image", "tool", "environment", "cpu", "memory_mib", "gpu", "studio_name", "checkpoint_base_uri", "boot_disk_size_gb", "data_links", "file_system_mounts", "session_disk_cap_gb", "conda_environment")
    class EnvironmentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    STUDIO_NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_BASE_URI_FIELD_NUMBER: _ClassVar[int]
    BOOT_DISK_SIZE_GB_FIELD_NUMBER: _ClassVar[int]
    DATA_LINKS_FIELD_NUMBER: _ClassVar[int]
    FILE_SYSTEM_MOUNTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_DISK_CAP_GB_FIELD_NUMBER: _ClassVar[int]
    CONDA_ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    image: str
    tool: str
    environment: _containers.ScalarMap[str, str]
    cpu: int
    memory_mib: int
    gpu: int
    studio_name: str
    checkpoint_base_uri: str
    boot_disk_size_gb: int
    data_links: _containers.RepeatedCompositeFieldContainer[DataLinkMount]
    file_system_mounts: _containers.RepeatedCompositeFieldContainer[FileSystemMount]
    session_disk_cap_gb: int
    conda_environment: str
    def __init__(self, image: _Optional[str] = ..., tool: _Optional[str] = ..., environment: _Optional[_Mapping[str, str]] = ..., cpu: _Optional[int] = ..., memory_mib: _Optional[int] = ..., gpu: _Optional[int] = ..., studio_name: _Optional[str] = ..., checkpoint_base_uri: _Optional[str] = ..., boot_disk_size_gb: _Optional[int] = ..., data_links: _Optional[_Iterable[_Union[DataLinkMount, _Mapping]]] = ..., file_system_mounts: _Optional[_Iterable[_Union[FileSystemMount, _Mapping]]] = ..., session_disk_cap_gb: _Optional[int] = ..., conda_environment: _Optional[str] = ...) -> None: ...

class DataLinkMount(_message.Message):
    __slots__ = ("data_link_id", "mount_name", "resource_ref", "read_only", "endpoint", "region", "access_key_id", "secret_access_key", "required")
    DATA_LINK_ID_FIELD_NUMBER: _ClassVar[int]
    MOUNT_NAME_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_REF_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ACCESS_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_ACCESS_KEY_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    data_link_id: str
    mount_name: str
    resource_ref: str
    read_only: bool
    endpoint: str
    region: str
    access_key_id: str
    secret_access_key: str
    required: bool
    def __init__(self, data_link_id: _Optional[str] = ..., mount_name: _Optional[str] = ..., resource_ref: _Optional[str] = ..., read_only: _Optional[bool] = ..., endpoint: _Optional[str] = ..., region: _Optional[str] = ..., access_key_id: _Optional[str] = ..., secret_access_key: _Optional[str] = ..., required: _Optional[bool] = ...) -> None: ...

class FileSystemMount(_message.Message):
    __slots__ = ("host_path", "mount_path", "read_only")
    HOST_PATH_FIELD_NUMBER: _ClassVar[int]
    MOUNT_PATH_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    host_path: str
    mount_path: str
    read_only: bool
    def __init__(self, host_path: _Optional[str] = ..., mount_path: _Optional[str] = ..., read_only: _Optional[bool] = ...) -> None: ...

class SessionAccess(_message.Message):
    __slots__ = ("user_ids",)
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, user_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SessionDesired(_message.Message):
    __slots__ = ("session_id", "status", "generation", "spec", "restore", "access")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    status: DesiredStatus
    generation: int
    spec: SessionSpec
    restore: CheckpointRef
    access: SessionAccess
    def __init__(self, session_id: _Optional[str] = ..., status: _Optional[_Union[DesiredStatus, str]] = ..., generation: _Optional[int] = ..., spec: _Optional[_Union[SessionSpec, _Mapping]] = ..., restore: _Optional[_Union[CheckpointRef, _Mapping]] = ..., access: _Optional[_Union[SessionAccess, _Mapping]] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("full", "sessions")
    FULL_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    full: bool
    sessions: _containers.RepeatedCompositeFieldContainer[SessionDesired]
    def __init__(self, full: _Optional[bool] = ..., sessions: _Optional[_Iterable[_Union[SessionDesired, _Mapping]]] = ...) -> None: ...
