"""Controllers sharing one PostgreSQL share one set of secrets (controller.shared_secrets),
and run a background job on one of them at a time (controller.leader)."""

from __future__ import annotations

import asyncio
import secrets
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.bootstrap import load_or_create_connect_key, open_ca
from controller.db import Database
from controller.errors import Unauthorized
from controller.leader import Leader, run_once_across_controllers
from controller.notify import decode, encode
from controller.secret_box import SecretBox, load_or_create_credentials_key
from controller.shared_secrets import SecretsKeyError, load_controller_secrets, read_secrets_key
from controller.signin import derive_session_key, sign_session, verify_session
from studios_shared.agent_pki import AgentIdentity
from studios_shared.connect_token import derive_agent_key


def _key_file(tmp_path: Path, text: str | None = None) -> Path:
    path = tmp_path / "secrets-key"
    path.write_text(text if text is not None else secrets.token_hex(32))
    return path


def _csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def test_a_missing_or_malformed_key_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(SecretsKeyError, match=r"--secrets-key-file .*missing.*cannot read"):
        read_secrets_key(tmp_path / "missing")
    with pytest.raises(SecretsKeyError, match="64 hex characters"):
        read_secrets_key(_key_file(tmp_path, "not hex"))
    with pytest.raises(SecretsKeyError, match="64 hex characters"):
        read_secrets_key(_key_file(tmp_path, "ab" * 16))
    assert len(read_secrets_key(_key_file(tmp_path))) == 32


async def test_every_controller_gets_the_same_secrets(
    tmp_path: Path, postgres_database: str
) -> None:
    key = read_secrets_key(_key_file(tmp_path))
    dbs = [Database(postgres_database) for _ in range(3)]
    try:
        await dbs[0].migrate()
        # Three controllers starting at once agree on one set.
        a, b, c = await asyncio.gather(
            *(load_controller_secrets(db, tmp_path / f"data-{i}", key) for i, db in enumerate(dbs))
        )
        assert a.shared and b.shared and c.shared
        assert a.connect_key == b.connect_key == c.connect_key
        assert a.credentials_key == b.credentials_key == c.credentials_key
        assert a.ca.hash == b.ca.hash == c.ca.hash

        # A credential sealed by one opens at another.
        sealed = SecretBox(a.credentials_key).seal({"secretKey": "s3cr3t"}, "credentials:7")
        assert SecretBox(b.credentials_key).open(sealed, "credentials:7") == {"secretKey": "s3cr3t"}
        # An agent certificate one signs, another's CA accepts (the agent endpoint).
        identity = AgentIdentity("agent-1", "env1")
        issued = a.ca.sign_agent(_csr(), identity, timedelta(days=1))
        found = b.ca.agent_of(issued.certificate_pem)
        assert found is not None and found[0] == identity
        # Connect tokens: the agents' keys derive from the one master key.
        assert derive_agent_key(a.connect_key, "agent-1") == derive_agent_key(
            c.connect_key, "agent-1"
        )
        # A sign-in cookie of one is valid at another (the user's token must exist:
        # verify_session checks it in the database, so only the signature is checked here).
        cookie = sign_session(
            derive_session_key(a.connect_key),
            token_id=1,
            user_id=1,
            token_hash="h",
            expires_at=2**40,
        )
        async with dbs[1].transaction() as session:
            with pytest.raises(Unauthorized) as refused:
                await verify_session(session, derive_session_key(b.connect_key), cookie)
            assert "tampered" not in refused.value.message
            with pytest.raises(Unauthorized, match="tampered or from another controller"):
                await verify_session(session, derive_session_key(b"x" * 32), cookie)
        # Each keeps its own server certificate (its own names), signed by the shared CA.
        key_pem, chain = b.ca.server_credentials(["localhost"])
        assert key_pem and (tmp_path / "data-1" / "pki" / "server.crt").exists()
        assert chain.endswith(a.ca.certificate_pem)
    finally:
        for db in dbs:
            await db.close()


async def test_a_wrong_key_is_refused_and_a_lone_controller_keeps_its_secrets(
    tmp_path: Path, postgres_database: str
) -> None:
    alone = tmp_path / "alone"
    alone.mkdir(mode=0o700)
    # A controller that ran alone before: its files become everyone's.
    connect = load_or_create_connect_key(alone)
    credentials = load_or_create_credentials_key(alone)
    ca_hash = open_ca(alone).hash
    db = Database(postgres_database)
    try:
        await db.migrate()
        key = read_secrets_key(_key_file(tmp_path))
        shared = await load_controller_secrets(db, alone, key)
        assert (shared.connect_key, shared.credentials_key, shared.ca.hash) == (
            connect,
            credentials,
            ca_hash,
        )
        other = await load_controller_secrets(db, tmp_path / "other", key)
        assert other.ca.hash == ca_hash
        with pytest.raises(SecretsKeyError, match="same secrets key file"):
            await load_controller_secrets(db, tmp_path / "third", secrets.token_bytes(32))
    finally:
        await db.close()


class _Job:
    """A job whose passes would overlap if two controllers ran it at once."""

    running = 0
    overlaps = 0
    passes: dict[str, int] = {}

    def __init__(self, leader: Leader) -> None:
        self.leader = leader

    @run_once_across_controllers("test-job")
    async def tick(self) -> None:
        _Job.running += 1
        _Job.overlaps += _Job.running > 1
        try:
            await asyncio.sleep(0.03)
        finally:
            _Job.running -= 1
        me = self.leader.controller_id
        _Job.passes[me] = _Job.passes.get(me, 0) + 1


async def test_a_job_runs_on_one_controller_at_a_time_and_moves_when_it_dies(
    postgres_database: str,
) -> None:
    dbs = [Database(postgres_database) for _ in range(2)]
    try:
        await dbs[0].migrate()
        jobs = [_Job(Leader(db, f"controller-{i}", lease_seconds=1.0)) for i, db in enumerate(dbs)]

        async def loop(job: _Job, seconds: float) -> None:
            end = asyncio.get_running_loop().time() + seconds
            while asyncio.get_running_loop().time() < end:
                await job.tick()
                await asyncio.sleep(0.01)

        await asyncio.gather(*(loop(job, 2.0) for job in jobs))
        assert _Job.overlaps == 0
        # One controller ran every pass.
        assert len(_Job.passes) == 1, _Job.passes
        holder = next(iter(_Job.passes))
        survivor = next(j for j in jobs if j.leader.controller_id != holder)
        # The holder dies (no release): the other takes the job once the lease ran out.
        await loop(survivor, 2.0)
        assert _Job.passes.get(survivor.leader.controller_id, 0) > 0
        assert _Job.overlaps == 0
    finally:
        for db in dbs:
            await db.close()


def test_notification_payloads_round_trip_and_stay_small() -> None:
    ids = {f"{i:08x}" for i in range(1200)}
    payloads = encode("agent-1", ids)
    assert len(payloads) == 3 and all(len(p) < 8000 for p in payloads)
    got: set[str] = set()
    for payload in payloads:
        decoded = decode(payload)
        assert decoded is not None and decoded[0] == "agent-1" and decoded[1] is not None
        got |= decoded[1]
    assert got == ids
    assert decode(encode("agent-2", None)[0]) == ("agent-2", None)
    assert decode("not json") is None
    assert decode('{"a": 1}') is None
    assert decode('{"a": "x", "s": [1]}') is None


async def test_a_pass_longer_than_the_lease_keeps_it(postgres_database: str) -> None:
    dbs = [Database(postgres_database) for _ in range(2)]
    try:
        await dbs[0].migrate()
        holder, other = (Leader(db, f"c{i}", lease_seconds=1.0) for i, db in enumerate(dbs))

        async def long_pass() -> str:
            await asyncio.sleep(2.5)
            return "done"

        async def nothing() -> str:
            return "ran"

        task = asyncio.create_task(holder.run("long-job", long_pass))
        await asyncio.sleep(0.3)
        # Renewed while it runs: the other controller never gets the job meanwhile.
        while not task.done():
            assert await other.run("long-job", nothing) == (False, None)
            await asyncio.sleep(0.2)
        assert task.result() == (True, "done")
    finally:
        for db in dbs:
            await db.close()
