"""What both sides of agent enrollment agree on: join tokens, CA pins, agent certificates.

A join token is `sjt1.<CA hash>.<secret>` (after kubeadm's bootstrap token plus
`--discovery-token-ca-cert-hash`): the secret admits one enrollment, the hash (SHA-256 of
the CA certificate's DER bytes, hex) lets the agent check the controller before it sends
the secret. An agent certificate names the agent id (subject CN and a URI SAN) and its
compute environment (subject OU and the same URI); `identity_of` reads them back.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = [
    "AgentIdentity",
    "JoinToken",
    "ca_hash",
    "format_join_token",
    "identity_of",
    "identity_uri",
    "new_key_and_csr",
    "parse_join_token",
]

_PREFIX = "sjt1"
_HASH = re.compile(r"^[0-9a-f]{64}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_URI_PREFIX = "urn:studios:agent:"


@dataclass(frozen=True)
class JoinToken:
    secret: str
    # SHA-256 of the controller CA certificate's DER bytes, lower-case hex.
    ca_hash: str

    def __str__(self) -> str:
        return format_join_token(self.secret, self.ca_hash)

    def __repr__(self) -> str:
        # Never the secret in a log line or a traceback.
        return f"JoinToken(ca_hash={self.ca_hash[:12]}...)"


def format_join_token(secret: str, ca_hash_hex: str) -> str:
    return f"{_PREFIX}.{ca_hash_hex}.{secret}"


def parse_join_token(text: str) -> JoinToken:
    """The token in a token file; ValueError saying what is wrong (never echoing it)."""
    parts = text.strip().split(".")
    if len(parts) != 3 or parts[0] != _PREFIX:
        raise ValueError(
            "not a join token (expected sjt1.<CA hash>.<secret>; an older controller's "
            "plain token carries no CA hash: take DIR/agent-token again, or create one "
            "with `studio-controller agent token create`)"
        )
    _, digest, secret = parts
    if not _HASH.match(digest):
        raise ValueError("the join token's CA hash is not 64 lower-case hex digits")
    if not _SECRET.match(secret):
        raise ValueError("the join token's secret is malformed")
    return JoinToken(secret=secret, ca_hash=digest)


def ca_hash(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class AgentIdentity:
    agent_id: str
    compute_env_id: str


def identity_uri(identity: AgentIdentity) -> str:
    return f"{_URI_PREFIX}{identity.agent_id}:compute-env:{identity.compute_env_id}"


def identity_of(cert: x509.Certificate) -> AgentIdentity | None:
    """The agent a certificate names (None when it names none, or two that disagree)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    ours = [u for u in uris if u.startswith(_URI_PREFIX)]
    if len(ours) != 1:
        return None
    agent_id, sep, env = ours[0][len(_URI_PREFIX) :].partition(":compute-env:")
    if not sep or not agent_id or not env:
        return None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cn) != 1 or cn[0].value != agent_id:
        return None
    return AgentIdentity(agent_id=agent_id, compute_env_id=env)


def new_key_and_csr(identity: AgentIdentity) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key (PEM, unencrypted: the file is 0600) and its CSR (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, identity.agent_id),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.compute_env_id),
                ]
            )
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)
