"""The controller's certificate authority for the agent endpoints.

Created on first start; it signs the controller's server certificate (the names agents
dial: `--grpc-advertise`) and the agents' client certificates (enrollment). Where its
files live is behind `CaFiles`, so that several controllers can later share one CA
(today: `DIR/pki/`, keys 0600).
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from studios_shared.agent_pki import AgentIdentity, ca_hash, identity_of, identity_uri

__all__ = [
    "AgentCA",
    "CaError",
    "CaFiles",
    "DirectoryCaFiles",
    "IssuedCertificate",
]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"

_CA_LIFETIME = timedelta(days=3650)
_SERVER_LIFETIME = timedelta(days=365)
# A server certificate closer than this to its end is issued again at start.
_SERVER_RENEW_BEFORE = timedelta(days=30)
# Clock skew between controller and agent hosts.
_BACKDATE = timedelta(minutes=5)


class CaError(Exception):
    """A request the CA will not sign (the message says why)."""


class CaFiles(Protocol):
    """Where the CA keeps its certificates and keys."""

    def read(self, name: str) -> bytes | None: ...

    def write(self, name: str, data: bytes, *, secret: bool) -> None: ...


class DirectoryCaFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes, *, secret: bool) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.root)
        try:
            # 0600 from the start (mkstemp): a key is never readable by others, not even
            # for the moment before a chmod.
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if not secret:
                os.chmod(tmp, 0o644)
            os.replace(tmp, self.root / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass(frozen=True)
class IssuedCertificate:
    certificate_pem: bytes
    serial: int
    not_after: datetime


class AgentCA:
    def __init__(self, files: CaFiles, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self._files = files
        self._key = key
        self.certificate = cert
        self.certificate_pem = cert.public_bytes(serialization.Encoding.PEM)
        # What join tokens pin.
        self.hash = ca_hash(cert)

    @classmethod
    def open(cls, files: CaFiles) -> AgentCA:
        """The CA in `files`, created when there is none yet."""
        key_pem, cert_pem = files.read(CA_KEY), files.read(CA_CERT)
        if key_pem is not None and cert_pem is not None:
            key = serialization.load_pem_private_key(key_pem, password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise CaError(f"{CA_KEY}: not an EC private key")
            return cls(files, key, x509.load_pem_x509_certificate(cert_pem))
        if key_pem is not None or cert_pem is not None:
            # Half a CA: never replace it silently, every enrolled agent trusts it.
            raise CaError(f"the CA has only one of {CA_KEY} and {CA_CERT}; restore the other")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Studios agent CA")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        files.write(CA_KEY, _key_pem(key), secret=True)
        files.write(CA_CERT, cert.public_bytes(serialization.Encoding.PEM), secret=False)
        return cls(files, key, cert)

    # ------------------------------------------------------------ server

    def server_credentials(self, names: Sequence[str]) -> tuple[bytes, bytes]:
        """(key PEM, certificate chain PEM) for the controller's TLS listeners.

        The stored certificate is reused while it covers `names` and is not near its end."""
        wanted = sorted(set(names))
        key_pem, cert_pem = self._files.read(SERVER_KEY), self._files.read(SERVER_CERT)
        if key_pem is not None and cert_pem is not None:
            cert = x509.load_pem_x509_certificate(cert_pem)
            if (
                _names_of(cert) == wanted
                and cert.not_valid_after_utc - datetime.now(UTC) > _SERVER_RENEW_BEFORE
                and self._signed_by_me(cert)
            ):
                return key_pem, cert_pem + self.certificate_pem
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        cert = (
            self._builder(key.public_key(), now, now + _SERVER_LIFETIME)
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, wanted[0])]))
            .add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in wanted]), critical=False
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(self._key, hashes.SHA256())
        )
        key_pem = _key_pem(key)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._files.write(SERVER_KEY, key_pem, secret=True)
        self._files.write(SERVER_CERT, cert_pem, secret=False)
        return key_pem, cert_pem + self.certificate_pem

    # ------------------------------------------------------------ agents

    def sign_agent(
        self, csr_pem: bytes, identity: AgentIdentity, lifetime: timedelta
    ) -> IssuedCertificate:
        """A client certificate for `identity` and the CSR's key.

        The names come from the controller, never from the CSR: the request only proves
        that the agent holds the key."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CaError(f"the certificate request is not a PEM CSR: {exc}") from None
        if not csr.is_signature_valid:
            raise CaError("the certificate request's signature does not verify")
        public_key = csr.public_key()
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if public_key.curve.key_size < 256:
                raise CaError("the certificate request's EC key is shorter than 256 bits")
        elif isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size < 2048:
                raise CaError("the certificate request's RSA key is shorter than 2048 bits")
        else:
            raise CaError("the certificate request's key is neither EC nor RSA")
        now = datetime.now(UTC)
        not_after = min(now + lifetime, self.certificate.not_valid_after_utc)
        cert = (
            self._builder(public_key, now, not_after)
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, identity.agent_id),
                        x509.NameAttribute(
                            NameOID.ORGANIZATIONAL_UNIT_NAME, identity.compute_env_id
                        ),
                    ]
                )
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(identity_uri(identity))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM),
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc,
        )

    def agent_of(self, cert_pem: bytes) -> tuple[AgentIdentity, int] | None:
        """(identity, serial) of an agent certificate this CA signed, else None.

        The TLS layer has verified the chain already; this checks again (a second CA
        must never be able to name agents) and reads the names."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            return None
        if not self._signed_by_me(cert):
            return None
        identity = identity_of(cert)
        return (identity, cert.serial_number) if identity is not None else None

    # ------------------------------------------------------------ helpers

    def _builder(
        self, public_key: object, not_before: datetime, not_after: datetime
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .issuer_name(self.certificate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )

    def _signed_by_me(self, cert: x509.Certificate) -> bool:
        if cert.issuer != self.certificate.subject:
            return False
        try:
            cert.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _names_of(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    names += sans.get_values_for_type(x509.DNSName)
    return sorted(set(names))
