"""Misconfiguration says what is wrong, once (issue 16): the real `studio-controller serve`
and `studio-agent serve` processes, each given one wrong setting, exit with status 2 and
one line on stderr naming the setting and the cause, no traceback.

The agent that must enroll and has no usable join token exits at once naming
`--token-file`; one enrolled already (its certificate in its state directory) does not
need the file and connects without it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e_harness import AgentProcess, ControllerProcess, RestClient, free_port, script


def _run(*argv: str, timeout: float = 60) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    return done.returncode, done.stderr, time.monotonic() - started


def _assert_one_line(stderr: str, prefix: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


def _controller(tmp_path: Path, *extra: str) -> tuple[int, str, float]:
    argv = [
        script("studio-controller"),
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--http",
        f"127.0.0.1:{free_port()}",
        "--grpc",
        f"127.0.0.1:{free_port()}",
        "--grpc-agents",
        f"127.0.0.1:{free_port()}",
        *extra,
    ]
    return _run(*argv)


@pytest.mark.parametrize("setting", ["--http", "--grpc", "--grpc-agents", "--metrics"])
def test_controller_port_in_use(tmp_path: Path, taken_port: int, setting: str) -> None:
    rc, err, _ = _controller(tmp_path, setting, f"127.0.0.1:{taken_port}")
    assert rc == 2, err
    _assert_one_line(
        err,
        f"studio-controller: {setting}: cannot listen on 127.0.0.1:{taken_port}: "
        "Address already in use",
    )


def test_controller_two_settings_one_port(tmp_path: Path) -> None:
    port = free_port()
    rc, err, _ = _controller(tmp_path, "--http", f"127.0.0.1:{port}", "--metrics", str(port))
    assert rc == 2
    _assert_one_line(err, f"studio-controller: --metrics: cannot listen on 127.0.0.1:{port}")


def test_controller_data_dir_not_creatable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc, err, _ = _run(
        script("studio-controller"),
        "serve",
        "--data-dir",
        str(blocker / "data"),
        "--http",
        "127.0.0.1:0",
    )
    assert rc == 2
    _assert_one_line(
        err, f"studio-controller: --data-dir: cannot create {blocker / 'data'}: Not a directory"
    )


def test_controller_database_unreachable(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: refused
    rc, err, _ = _controller(
        tmp_path, "--database", f"postgresql://studios:s3cret@127.0.0.1:{port}/studios"
    )
    assert rc == 2
    _assert_one_line(
        err,
        f"studio-controller: --database: cannot connect to "
        f"postgresql+asyncpg://studios:***@127.0.0.1:{port}/studios: Connection refused",
    )
    assert "s3cret" not in err


def test_controller_templates_file(tmp_path: Path) -> None:
    missing = tmp_path / "templates.yaml"
    rc, err, _ = _controller(tmp_path, "--templates", str(missing))
    assert rc == 2
    _assert_one_line(err, f"studio-controller: --templates: {missing}: cannot read")
    missing.write_text("templates: [\n")
    rc, err, _ = _controller(tmp_path, "--templates", str(missing))
    assert rc == 2
    _assert_one_line(err, f"studio-controller: --templates: {missing}: not YAML")


def test_controller_secrets_key_file_unreadable(tmp_path: Path) -> None:
    key = tmp_path / "secrets.key"
    rc, err, _ = _controller(tmp_path, "--secrets-key-file", str(key))
    assert rc == 2
    _assert_one_line(err, f"studio-controller: --secrets-key-file: {key}: cannot read it")


@pytest.mark.parametrize(
    ("name", "damage", "cause"),
    [
        ("pki/ca.key", "directory", "cannot read {path}: Is a directory"),
        ("pki/ca.key", "garbage", "{path}: not a PEM private key (Unable to load PEM file)"),
        ("pki/ca.crt", "garbage", "{path}: not a PEM certificate"),
        ("credentials-key", "garbage", "{path}: not a key of 64 hex characters"),
        ("pki/server.key", "directory", "cannot read {path}: Is a directory"),
    ],
)
def test_controller_data_dir_secret_unreadable(
    tmp_path: Path, name: str, damage: str, cause: str
) -> None:
    """A secret the data directory holds that cannot be read or parsed names --data-dir,
    the file and the cause (it exited 1 with "cannot start: [Errno 21] ..." before)."""
    data = tmp_path / "data"
    path = data / name
    path.parent.mkdir(parents=True)
    if damage == "directory":
        path.mkdir()  # unreadable to root too, unlike a chmod 000 file
    else:
        path.write_text("garbage\n")
    rc, err, _ = _controller(tmp_path)
    assert rc == 2, err
    _assert_one_line(err, f"studio-controller: --data-dir: {cause.format(path=path)}")
    assert path.exists(), "a damaged secret is reported, never replaced"


def test_controller_data_dir_half_a_ca(tmp_path: Path) -> None:
    pki = tmp_path / "data" / "pki"
    pki.mkdir(parents=True)
    (pki / "ca.key").write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    rc, err, _ = _controller(tmp_path)
    assert rc == 2, err
    _assert_one_line(
        err, f"studio-controller: --data-dir: {pki}: the agent CA has ca.key but not ca.crt"
    )


def test_controller_config_file_bad_key(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    config.write_text('data-dir = "/tmp/x"\nlisten = "0.0.0.0:80"\n')
    rc, err, _ = _run(script("studio-controller"), "serve", "--config", str(config))
    assert rc == 2
    _assert_one_line(err, f"studio-controller: {config}: unknown key 'listen'")


# ---------------------------------------------------------------- the agent


@pytest.fixture
def join_token(tmp_path: Path) -> Path:
    """A real join token, from `studio-controller agent token create` (no server needed:
    the agent checks such settings before it dials the controller)."""
    done = subprocess.run(
        [
            script("studio-controller"),
            "agent",
            "token",
            "create",
            "--data-dir",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    path = tmp_path / "agent-token"
    path.write_text(done.stdout.strip())
    return path


def _agent(tmp_path: Path, token: Path, *extra: str) -> tuple[int, str, float]:
    argv = [
        script("studio-agent"),
        "serve",
        "--controller",
        f"127.0.0.1:{free_port()}",
        "--token-file",
        str(token),
        "--compute-env",
        "ce",
        "--state-dir",
        str(tmp_path / "state"),
        "--proxy",
        f"127.0.0.1:{free_port()}",
        "--volume-kind",
        "directory",
        *extra,
    ]
    return _run(*argv)


def test_agent_proxy_port_in_use(tmp_path: Path, join_token: Path, taken_port: int) -> None:
    rc, err, _ = _agent(tmp_path, join_token, "--proxy", f"127.0.0.1:{taken_port}")
    assert rc == 2
    _assert_one_line(
        err,
        f"studio-agent: --proxy: cannot listen on 127.0.0.1:{taken_port}: Address already in use",
    )


def test_agent_metrics_port_in_use(tmp_path: Path, join_token: Path, taken_port: int) -> None:
    rc, err, _ = _agent(tmp_path, join_token, "--metrics", str(taken_port))
    assert rc == 2
    _assert_one_line(
        err,
        f"studio-agent: --metrics: cannot listen on 127.0.0.1:{taken_port}: Address already in use",
    )


def test_agent_state_dir_not_creatable(tmp_path: Path, join_token: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, err, _ = _agent(tmp_path, join_token, "--state-dir", str(blocker / "state"))
    assert rc == 2
    _assert_one_line(
        err, f"studio-agent: --state-dir: cannot create {blocker / 'state'}: Not a directory"
    )


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable"])
def test_agent_token_file_exits_at_once(tmp_path: Path, case: str) -> None:
    token = tmp_path / "agent-token"
    expected = {
        "missing": f"cannot read token file {token}: No such file or directory",
        "empty": f"token file {token} is empty",
        "unreadable": f"cannot read token file {token}: Is a directory",
    }[case]
    if case == "empty":
        token.write_text("\n")
    elif case == "unreadable":
        token.mkdir()  # unreadable as a file whoever runs the test (root reads any mode)
    rc, err, seconds = _agent(tmp_path, token)
    assert rc == 2
    _assert_one_line(err, f"studio-agent: --token-file: {expected}")
    assert seconds < 30, "it does not retry"


def test_agent_tls_files_unreadable(tmp_path: Path, join_token: Path) -> None:
    pki = tmp_path / "state" / "pki"
    pki.mkdir(parents=True)
    (pki / "ca.crt").write_text("")
    (pki / "agent.key").mkdir()  # unreadable as a file, whoever runs the test
    (pki / "agent.crt").write_text("")
    rc, err, _ = _agent(tmp_path, join_token)
    assert rc == 2
    _assert_one_line(
        err,
        f"studio-agent: --state-dir: cannot read this agent's certificate and key in {pki}: "
        f"{pki / 'agent.key'}: Is a directory",
    )


def test_agent_config_file_bad_type(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('stop-grace-seconds = "thirty"\n')
    rc, err, _ = _run(script("studio-agent"), "serve", "--config", str(config))
    assert rc == 2
    _assert_one_line(err, f"studio-agent: {config}: stop-grace-seconds: expected a number")


@pytest.mark.e2e
async def test_enrolled_agent_needs_no_token_file(tmp_path: Path) -> None:
    controller = ControllerProcess(tmp_path / "controller")
    controller.start()
    agent: AgentProcess | None = None
    api: RestClient | None = None
    try:
        await controller.wait_ready()
        api = RestClient(controller.url, controller.admin_token)
        env_id = await api.create_compute_env("local", tmp_path / "work")
        token = tmp_path / "join-token"
        token.write_text(controller.agent_token_file.read_text())
        os.chmod(token, 0o600)
        agent = _token_agent(controller, env_id, tmp_path, token)
        agent.start()
        await _wait_connected(api, agent)
        agent.stop()

        token.unlink()  # enrolled: its certificate is in its state directory
        agent = _token_agent(controller, env_id, tmp_path, token)
        agent.start()
        await _wait_connected(api, agent)
        assert agent.alive()
    finally:
        if agent is not None:
            agent.stop()
        if api is not None:
            await api.close()
        controller.stop()


def _token_agent(
    controller: ControllerProcess, env_id: str, tmp_path: Path, token: Path
) -> AgentProcess:
    agent = AgentProcess(
        controller, env_id, tmp_path / "agent", extra_args=["--volume-kind", "directory"]
    )
    agent.argv[agent.argv.index("--token-file") + 1] = str(token)
    return agent


async def _wait_connected(api: RestClient, agent: AgentProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert agent.alive(), agent.log_tail()
        _, listing = await api.request("GET", "/agents", expect=200)
        if any(a["connected"] for a in listing["agents"]):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"agent did not connect:\n{agent.log_tail()}")
