"""The agent's side of enrollment: its key and certificate, and how it gets and renews them.

The state directory holds `pki/ca.crt` (the controller's CA, the one the join token
pins), `pki/agent.key` (this agent's EC key, 0600 from its creation; it never leaves the
host) and `pki/agent.crt` (the certificate the controller issued for that key, naming the
agent id and compute environment).

Without a certificate the agent enrolls (`Enroller.enroll`): it parses the join token, opens
a TLS connection to the enrollment endpoint *without* verification, takes from the chain
the server presents the certificate whose SHA-256 is the token's pin (refusing to go on
when there is none: the token is never sent to a controller it has not verified), then
calls Enroll over gRPC with that CA as the only root, a fresh key's CSR and the token as
`authorization: Bearer <join token>`.

Rotation: a certificate is renewed once less than a third of its lifetime is left, the
lifetime counted from when this agent received it (the file's mtime, clamped to the
certificate's validity: the controller backdates notBefore for clock skew, which would
otherwise make a short certificate look due at once) to its notAfter.

A new key and certificate replace the old pair so that a crash never leaves a key that does
not match the certificate: both are written complete to `agent.key.new` and
`agent.crt.new` first, then renamed into place key first; a `.new` certificate found at
start finishes the commit (`PkiFiles.recover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from studios.agent.v1 import agent_pb2 as pb
from studios.agent.v1 import agent_pb2_grpc as pb_grpc

from agent.errors import AgentError
from agent.state import StateDir, atomic_write_bytes
from studios_shared.agent_pki import (
    AgentIdentity,
    JoinToken,
    ca_hash,
    identity_of,
    new_key_and_csr,
    parse_join_token,
)

__all__ = [
    "Credentials",
    "EnrollRefused",
    "Enroller",
    "EnrollmentError",
    "PkiFiles",
    "agent_endpoint_target",
    "describe_tls_failure",
    "enroll",
    "fetch_endpoints",
    "fetch_pinned_ca",
    "read_join_token",
    "renew",
    "split_host_port",
]

log = logging.getLogger(__name__)

# Unary calls to the controller (Endpoints, Enroll, RenewCertificate).
RPC_TIMEOUT = 30.0
# The TLS handshake that fetches the controller's CA.
_HANDSHAKE_TIMEOUT = 15.0
# The lifetime left when a certificate is renewed.
RENEW_WHEN_LEFT = 1 / 3


class EnrollmentError(AgentError):
    """This agent cannot get or use a certificate; the message says what to do."""


class EnrollRefused(EnrollmentError):
    """The controller refused Enroll; `code` and `details` are its answer."""

    def __init__(self, message: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


# ---------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credentials:
    """What the agent proves itself with on the agent endpoint."""

    ca_pem: bytes = field(repr=False)
    # Never in a repr: a log line or a traceback must not carry the key.
    key_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    identity: AgentIdentity
    not_after: datetime
    # The start of the lifetime the renewal rule counts (see the module docstring).
    received_at: datetime
    serial: int

    @property
    def renew_at(self) -> datetime:
        return self.not_after - (self.not_after - self.received_at) * RENEW_WHEN_LEFT

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.not_after

    def renewal_due(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.renew_at

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )


def _credentials(
    ca_pem: bytes, key_pem: bytes, cert_pem: bytes, received_at: datetime
) -> Credentials:
    """The three files as Credentials; EnrollmentError when they do not belong together."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise EnrollmentError(f"unreadable key or certificate: {exc}") from None
    if key.public_key() != cert.public_key():
        raise EnrollmentError("the private key does not match the certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:
        raise EnrollmentError("the certificate is not signed by the controller's CA") from None
    identity = identity_of(cert)
    if identity is None:
        raise EnrollmentError("the certificate names no agent")
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    return Credentials(
        ca_pem=ca_pem,
        key_pem=key_pem,
        cert_pem=cert_pem,
        identity=identity,
        not_after=not_after,
        received_at=min(max(received_at, not_before), not_after),
        serial=cert.serial_number,
    )


class PkiFiles:
    """`DIR/pki/`: the pinned CA, this agent's key and its certificate."""

    def __init__(self, state: StateDir) -> None:
        self.state = state

    @property
    def _key_new(self) -> Path:
        return self.state.agent_key_path.with_name("agent.key.new")

    @property
    def _cert_new(self) -> Path:
        return self.state.agent_cert_path.with_name("agent.crt.new")

    def _ensure_dir(self) -> None:
        self.state.pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state.pki_dir, 0o700)

    def save_ca(self, ca_pem: bytes) -> None:
        self._ensure_dir()
        atomic_write_bytes(self.state.ca_cert_path, ca_pem, mode=0o644)

    def load_ca(self) -> bytes | None:
        try:
            return self.state.ca_cert_path.read_bytes()
        except FileNotFoundError:
            return None

    def save_pair(self, key_pem: bytes, cert_pem: bytes, received_at: datetime) -> None:
        """Replace key and certificate together (see the module docstring for the order)."""
        self._ensure_dir()
        # atomic_write_bytes creates its temporary file 0600 (mkstemp) and only then sets
        # the mode: the key is never readable by others, not even for a moment.
        atomic_write_bytes(self._key_new, key_pem, mode=0o600)
        atomic_write_bytes(self._cert_new, cert_pem, mode=0o644)
        stamp = received_at.timestamp()
        os.utime(self._cert_new, (stamp, stamp))
        self._fsync_dir()
        self._commit()

    def _commit(self) -> None:
        # Key first: a crash after it leaves `agent.crt.new`, which `recover` puts in place.
        if self._key_new.exists():
            os.replace(self._key_new, self.state.agent_key_path)
        os.replace(self._cert_new, self.state.agent_cert_path)
        self._fsync_dir()

    def recover(self) -> None:
        """Finish a replacement a crash interrupted, or drop one that was never complete."""
        if self._cert_new.exists():
            log.info("finishing an interrupted certificate replacement in %s", self.state.pki_dir)
            self._commit()
        elif self._key_new.exists():
            # The crash came before the new certificate was written: the old pair stands.
            self._key_new.unlink(missing_ok=True)

    def _fsync_dir(self) -> None:
        fd = os.open(self.state.pki_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self) -> Credentials | None:
        """The stored credentials; None when this agent has not enrolled (or they are
        unusable, which is logged: the agent then enrolls again)."""
        if not self.state.pki_dir.is_dir():
            return None
        self.recover()
        paths = (self.state.ca_cert_path, self.state.agent_key_path, self.state.agent_cert_path)
        try:
            ca_pem, key_pem, cert_pem = (p.read_bytes() for p in paths)
            received = os.stat(self.state.agent_cert_path).st_mtime
        except FileNotFoundError:
            return None
        try:
            return _credentials(ca_pem, key_pem, cert_pem, datetime.fromtimestamp(received, UTC))
        except EnrollmentError as exc:
            log.warning("ignoring the stored certificate in %s: %s", self.state.pki_dir, exc)
            return None

    def store(self, ca_pem: bytes, key_pem: bytes, cert_pem: bytes) -> Credentials:
        """Check and store a certificate just issued for `key_pem`."""
        now = datetime.now(UTC)
        creds = _credentials(ca_pem, key_pem, cert_pem, now)
        self.save_pair(key_pem, cert_pem, now)
        return creds


# ---------------------------------------------------------------- addresses


def split_host_port(target: str) -> tuple[str, int]:
    """ "HOST:PORT" or "[V6]:PORT" as (host, port)."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise EnrollmentError(f"expected HOST:PORT, got {target!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def agent_endpoint_target(controller: str, agent_endpoint: str) -> str:
    """Where to dial the agent endpoint that Endpoints named (an empty host: the host the
    agent reached the enrollment endpoint at)."""
    if not agent_endpoint:
        raise EnrollmentError("the controller did not say where its agent endpoint is")
    host, port = split_host_port(agent_endpoint)
    return _join(host or split_host_port(controller)[0], port)


# ---------------------------------------------------------------- the CA pin


def _presented_chain(tls: ssl.SSLSocket) -> list[bytes]:
    """DER of every certificate the peer sent, leaf first, as sent (nothing verified).

    The public ssl API of Python 3.11 gives the leaf only (`getpeercert`); the chain as
    sent is reachable through the private `_sslobj.get_unverified_chain()` (CPython 3.10+,
    `_ssl.Certificate` objects); 3.13 made it public (`SSLSocket.get_unverified_chain()`,
    DER bytes). Kept here, in one place, for when that changes again."""
    public = getattr(tls, "get_unverified_chain", None)
    if public is not None:
        return [bytes(c) for c in public()]
    private: Any = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)
    if private is None:
        raise EnrollmentError(
            "this Python's ssl module cannot show the certificate chain a server presents "
            "(needs CPython 3.10 or later), so the controller's CA cannot be checked "
            "against the join token"
        )
    der = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]
    return [c.public_bytes(der) for c in private() or ()]


def fetch_pinned_ca(target: str, pin: str) -> bytes:
    """The controller's CA certificate (PEM), taken from the chain its enrollment endpoint
    presents and checked against `pin`. Blocking: a TLS handshake and nothing else is
    sent (no HTTP/2, no token)."""
    host, port = split_host_port(target)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Not verified on purpose: what verifies this controller is the pin, below.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=_HANDSHAKE_TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            chain = _presented_chain(tls)
    except ssl.SSLError as exc:
        raise EnrollmentError(
            f"no TLS handshake with the controller's enrollment endpoint {target}: {exc} "
            "(a controller older than TLS on the agent endpoint must be upgraded first)"
        ) from None
    except OSError as exc:
        # Not the operator's to fix here (the controller is down, or not there yet): the
        # link retries and logs it as it does any unreachable controller.
        raise ConnectionError(f"cannot reach the controller at {target}: {exc}") from None
    certs = []
    for der in chain:
        with contextlib.suppress(ValueError):
            certs.append(x509.load_der_x509_certificate(der))
    for cert in certs:
        if ca_hash(cert) == pin:
            return cert.public_bytes(serialization.Encoding.PEM)
    presented = ca_hash(certs[-1]) if certs else "(no certificate)"
    raise EnrollmentError(
        f"CA pin mismatch: the controller at {target} presents CA sha256 {presented}, "
        f"the join token pins {pin}; not enrolling (is something else answering at that "
        "address, or is the token from another controller?)"
    )


# ---------------------------------------------------------------- tokens


def read_join_token(path: Path) -> tuple[JoinToken, str]:
    """(parsed token, its text) from the token file; EnrollmentError saying what to fix."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise EnrollmentError(f"cannot read token file {path}: {exc}") from None
    if not text:
        raise EnrollmentError(f"token file {path} is empty")
    try:
        return parse_join_token(text), text
    except ValueError as exc:
        raise EnrollmentError(f"token file {path}: {exc}") from None


# ---------------------------------------------------------------- TLS failures


_HOSTNAME_FAILURES = (
    # grpcio 1.85 (tried): "Custom verification check failed with error: UNAUTHENTICATED:
    # Hostname Verification Check failed."
    "hostname verification",
    # Older grpcio: "Peer name HOST is not in peer certificate".
    "is not in peer certificate",
)


_VERIFY_FAILURES = (
    # grpcio 1.85 (tried): "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ...
    # CERTIFICATE_VERIFY_FAILED: self signed certificate in certificate chain".
    "certificate_verify_failed",
    "certificate verify failed",
)


def describe_tls_failure(
    exc: grpc.aio.AioRpcError, target: str, *, enrolling: bool = False
) -> str | None:
    """A sentence for a TLS failure grpc reports as UNAVAILABLE, None for other errors."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    details = exc.details() or ""
    lowered = details.lower()
    host = split_host_port(target)[0]
    if any(marker in lowered for marker in _HOSTNAME_FAILURES):
        return (
            f"the controller's certificate does not name {host}; set --grpc-advertise on the "
            f"controller (or dial a name it carries) [{details}]"
        )
    if any(marker in lowered for marker in _VERIFY_FAILURES):
        if enrolling:
            # The pinned CA was in the chain (it is public), the server's own certificate
            # is not signed by it: someone else answers at that address.
            return (
                f"the server at {target} presents the pinned CA but a certificate that CA "
                f"did not sign; not enrolling [{details}]"
            )
        return (
            f"the controller at {target} presents a certificate that the CA this agent "
            f"enrolled with did not sign (a new controller CA? revoke this agent, remove "
            f"the state directory's pki/ and enroll it again with a new join token) "
            f"[{details}]"
        )
    return None


# ---------------------------------------------------------------- RPCs


def _stub(channel: grpc.aio.Channel) -> Any:
    # grpcio-tools writes the service stub without annotations (no .pyi for it).
    return pb_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]


async def fetch_endpoints(target: str, ca_pem: bytes) -> pb.EndpointsResponse:
    """Endpoints from the enrollment endpoint (server TLS with the pinned CA)."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(target, creds) as channel:
        response: pb.EndpointsResponse = await _stub(channel).Endpoints(
            pb.EndpointsRequest(), timeout=RPC_TIMEOUT
        )
        return response


async def enroll(
    target: str,
    token_text: str,
    ca_pem: bytes,
    identity: AgentIdentity,
    hostname: str,
    capacity: pb.HostCapacity,
) -> tuple[bytes, pb.EnrollResponse]:
    """(key PEM, the controller's answer): a fresh key, its CSR, and Enroll with the token
    over TLS verified by the pinned CA only. grpc.aio.AioRpcError when refused."""
    key_pem, csr_pem = new_key_and_csr(identity)
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(target, creds) as channel:
        response: pb.EnrollResponse = await _stub(channel).Enroll(
            pb.EnrollRequest(
                agent_id=identity.agent_id,
                compute_env_id=identity.compute_env_id,
                csr_pem=csr_pem,
                hostname=hostname,
                capacity=capacity,
            ),
            metadata=(("authorization", f"Bearer {token_text}"),),
            timeout=RPC_TIMEOUT,
        )
    return key_pem, response


async def renew(channel: grpc.aio.Channel, identity: AgentIdentity) -> tuple[bytes, bytes]:
    """(new key PEM, new certificate PEM) from RenewCertificate on `channel` (the agent
    endpoint, mutual TLS with the current certificate)."""
    key_pem, csr_pem = new_key_and_csr(identity)
    response: pb.RenewCertificateResponse = await _stub(channel).RenewCertificate(
        pb.RenewCertificateRequest(csr_pem=csr_pem), timeout=RPC_TIMEOUT
    )
    return key_pem, bytes(response.certificate_pem)


def not_after_text(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expiry_message(creds: Credentials) -> str:
    return f"this agent's certificate expired at {not_after_text(creds.not_after)}"


def renewal_retry_delay(creds: Credentials, now: datetime | None = None) -> float:
    """How long to wait before trying a failed renewal again: a tenth of what is left,
    between one second and a minute (a minute once it has expired)."""
    left = (creds.not_after - (now or datetime.now(UTC))).total_seconds()
    return 60.0 if left <= 0 else max(1.0, min(60.0, left / 10))


def seconds_until(when: datetime) -> float:
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# ---------------------------------------------------------------- enrolling


class Enroller:
    """Gets this agent a certificate with the join token in `token_file`."""

    def __init__(self, *, target: str, token_file: Path, pki: PkiFiles) -> None:
        self.target = target
        self.token_file = token_file
        self.pki = pki

    async def enroll(
        self,
        identity: AgentIdentity,
        hostname: str,
        capacity: pb.HostCapacity,
        why: str = "",
    ) -> Credentials:
        """The stored credentials. The agent id is the certificate's (EnrollResponse.agent_id
        says the same; the controller may assign another id than the one asked for).

        EnrollmentError for what the operator must fix here (token file, CA pin);
        EnrollRefused for the controller's refusal; other grpc errors as they come."""
        prefix = f"{why}; " if why else ""
        try:
            token, text = await asyncio.to_thread(read_join_token, self.token_file)
        except EnrollmentError as exc:
            raise EnrollmentError(f"{prefix}{exc}") from None
        ca_pem = await asyncio.to_thread(fetch_pinned_ca, self.target, token.ca_hash)
        await asyncio.to_thread(self.pki.save_ca, ca_pem)
        log.info("enrolling with controller %s (CA sha256 %s)", self.target, token.ca_hash)
        try:
            key_pem, response = await enroll(
                self.target, text, ca_pem, identity, hostname, capacity
            )
        except grpc.aio.AioRpcError as exc:
            tls = describe_tls_failure(exc, self.target, enrolling=True)
            if tls is not None:
                raise EnrollmentError(f"{prefix}{tls}") from None
            if exc.code() in _REFUSALS:
                raise EnrollRefused(
                    f"{prefix}controller {self.target} refused this agent's token "
                    f"({exc.code().name}: {exc.details()}); check --token-file "
                    f"{self.token_file} (take DIR/agent-token from the controller again, or "
                    "create one with `studio-controller agent token create`)",
                    exc.code(),
                    exc.details() or "",
                ) from None
            raise
        if response.ca_certificate_pem and response.ca_certificate_pem.strip() != ca_pem.strip():
            log.warning("the controller's EnrollResponse names another CA than the pinned one")
        try:
            creds = await asyncio.to_thread(
                self.pki.store, ca_pem, key_pem, bytes(response.certificate_pem)
            )
        except EnrollmentError as exc:
            raise EnrollmentError(
                f"{prefix}the certificate controller {self.target} issued is unusable: {exc}"
            ) from None
        log.info(
            "enrolled as agent %s of compute environment %s; certificate valid until %s",
            creds.identity.agent_id,
            creds.identity.compute_env_id,
            not_after_text(creds.not_after),
        )
        if response.agent_id and response.agent_id != creds.identity.agent_id:
            log.warning(
                "EnrollResponse names agent %s, its certificate %s: the certificate counts",
                response.agent_id,
                creds.identity.agent_id,
            )
        return creds


_REFUSALS = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)
