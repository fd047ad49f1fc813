"""Controller configuration: what `studio-controller serve` is told."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_AGENT_CERT_LIFETIME_SECONDS",
    "ControllerConfig",
    "normalize_database_url",
    "parse_duration",
    "parse_host_port",
]

DEFAULT_AGENT_CERT_LIFETIME_SECONDS = 30 * 86400.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, *, what: str) -> float:
    """Seconds from ``3600``, ``90s``, ``30m``, ``24h`` or ``30d``."""
    value = text.strip().lower()
    unit = 1
    if value and value[-1] in _UNITS:
        unit = _UNITS[value[-1]]
        value = value[:-1]
    try:
        seconds = float(value) * unit
    except ValueError:
        raise ValueError(f"{what}: expected seconds or e.g. 30d, 24h, 15m, got {text!r}") from None
    if seconds < 0:
        raise ValueError(f"{what}: must not be negative, got {text!r}")
    return seconds


def parse_host_port(text: str, *, what: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6); port 0 picks a free port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{what}: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{what}: port must be an integer, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{what}: port out of range: {port}")
    return host, port


def normalize_database_url(url: str) -> str:
    """Accept plain ``sqlite://`` / ``postgresql://`` URLs and pick the async driver."""
    if url.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + url[len("sqlite:") :]
    for prefix in ("postgresql:", "postgres:"):
        if url.startswith(prefix):
            return "postgresql+asyncpg:" + url[len(prefix) :]
    return url


@dataclass(slots=True)
class ControllerConfig:
    data_dir: Path
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # The enrollment endpoint (server TLS: Endpoints and Enroll): what agents are told.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 8081
    # The agent endpoint (mutual TLS: RenewCertificate and Connect).
    grpc_agents_host: str = "127.0.0.1"
    grpc_agents_port: int = 8082
    # Names of the server certificate; None: controller.app.default_server_names.
    grpc_advertise: list[str] | None = None
    # What Endpoints answers (HOST:PORT); None: ":<bound agents port>" (an empty host is
    # the host the agent reached the enrollment endpoint at).
    grpc_agents_advertise: str | None = None
    # Lifetime of agent certificates; agents renew at two thirds of it.
    agent_cert_lifetime_seconds: float = DEFAULT_AGENT_CERT_LIFETIME_SECONDS
    # None: sqlite+aiosqlite:///<data_dir>/studios.db
    database_url: str | None = None
    # None: http://<http host>:<bound http port>
    public_url: str | None = None
    heartbeat_interval_seconds: int = 10
    # How often the reconciler places pending starts.
    reconcile_interval_seconds: float = 5.0
    # How often every connected agent gets its full desired state again.
    resync_interval_seconds: float = 60.0
    connect_token_ttl_seconds: float = 60.0
    # The separate /metrics listener (`--metrics`); port None: not served.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    # How often sessions past their lifespan are looked for (and stopped).
    lifespan_check_interval_seconds: float = 30.0
    # Lost agents and deadlines (controller.deadlines): an agent with no stream and no
    # heartbeat this long is lost (its studios errored); a start (custom environment
    # build included) or a stop not done this long after it began errors the studio.
    agent_lost_seconds: float = 300.0
    starting_deadline_seconds: float = 1800.0
    stopping_deadline_seconds: float = 1800.0
    # Checkpoint garbage collection (controller.checkpoint_gc): how often every store
    # is collected, how soon a deleted studio is noticed, and the engine's grace
    # period (unreferenced packs younger than this are kept).
    checkpoint_gc_interval_seconds: float = 6 * 3600.0
    checkpoint_gc_poll_seconds: float = 10.0
    checkpoint_gc_grace_seconds: float = 3600.0
    # S3-compatible endpoint of s3:// checkpoint stores (else STUDIOS_S3_ENDPOINT); keys
    # from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    s3_endpoint: str | None = None
    # The template catalogue (YAML, controller.templates); None: the packaged
    # controller/templates.yaml.
    templates_file: Path | None = None
    # Several controllers on one PostgreSQL (README "Operating"): the key that seals the
    # shared secrets in the database (controller.shared_secrets); None: this data
    # directory's own secrets (one controller).
    secrets_key_file: Path | None = None
    # This controller's name in agent and job leases; None: host name, pid and a random part.
    controller_id: str | None = None
    # An agent's lease: it counts as connected this long after its last renewal.
    agent_lease_seconds: float = 30.0
    # A background job's lease (controller.leader): how soon another controller takes
    # over a job whose holder died.
    job_lease_seconds: float = 15.0

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return normalize_database_url(self.database_url)
        return f"sqlite+aiosqlite:///{self.data_dir.resolve() / 'studios.db'}"
