"""The daemons' TOML config files (studios_shared.config_file, issue 16): keys are the
`serve` flags without `--`; the command line overrides the file; an unknown key or a
wrong type names the key and the file. With the real parsers of both daemons, and the
real controller process reading its file."""

from __future__ import annotations

import argparse
import socket
import subprocess
import time
from pathlib import Path

import pytest

from agent.cli import build_parser as agent_parser
from controller.cli import _parser as controller_parser
from studios_shared.config_file import (
    ConfigFileError,
    apply_config_file,
    config_source,
    subcommand_argv,
    subparser,
)
from tests.e2e_harness import free_port, script


def _load(
    parser: argparse.ArgumentParser, argv: list[str], path: Path | None, required: tuple[str, ...]
) -> argparse.Namespace:
    args = parser.parse_args(argv)
    apply_config_file(
        subparser(parser, "serve"), args, subcommand_argv(argv, "serve"), path, required
    )
    return args


def test_controller_file_fills_in_and_the_command_line_overrides(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(
        'data-dir = "/var/lib/studios"\n'
        'http = "0.0.0.0:80"\n'
        'grpc = "0.0.0.0:81"\n'
        "resync-interval-seconds = 0\n"
        "agent-lost-seconds = 120.5\n"
        'log-format = "json"\n'
    )
    argv = ["serve", "--config", str(config), "--http", "127.0.0.1:9000"]
    args = _load(controller_parser(), argv, config, ("--data-dir",))
    assert args.data_dir == Path("/var/lib/studios")  # from the file, as the flag's type
    assert args.http == "127.0.0.1:9000"  # the command line wins
    assert args.grpc == "0.0.0.0:81"
    assert args.resync_interval_seconds == 0.0 and isinstance(args.resync_interval_seconds, float)
    assert args.agent_lost_seconds == 120.5
    assert args.log_format == "json"
    assert args.grpc_agents == "127.0.0.1:8082"  # neither: the default


def test_agent_file_lists_choices_and_types(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'controller = "a:8081,b:8081"\n'
        'token-file = "/etc/studios/agent-token"\n'
        'compute-env = "ce1"\n'
        'state-dir = "/var/lib/studio-agent"\n'
        'proxy = "0.0.0.0:7070"\n'
        'runtime = "podman"\n'
        'conda-channel = ["https://conda.example/main", "https://conda.example/extra"]\n'
        'allow-host-path = ["/data"]\n'
    )
    argv = ["serve", "--conda-channel", "https://mirror/only"]
    args = _load(agent_parser(), argv, config, ("--controller", "--state-dir"))
    assert args.controller == "a:8081,b:8081"
    assert args.token_file == Path("/etc/studios/agent-token")
    assert args.proxy == ("0.0.0.0", 7070)  # through the flag's own HOST:PORT parser
    assert args.runtime == "podman"
    # A repeatable flag on the command line replaces the file's whole list.
    assert args.conda_channel == ["https://mirror/only"]
    assert args.allow_host_path == ["/data"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('data_dir = "/x"\n', "unknown key 'data_dir' (keys are the flags without '--'"),
        ('colour = "red"\n', "unknown key 'colour'"),
        ("http = 8080\n", "http: expected a string, got int 8080"),
        ('resync-interval-seconds = "60"\n', "resync-interval-seconds: expected a number"),
        ("resync-interval-seconds = true\n", "resync-interval-seconds: expected a number"),
        ('log-format = "xml"\n', "log-format: 'xml' is not one of 'text', 'json'"),
        ("data-dir = [\n", "not valid TOML"),
    ],
)
def test_controller_file_errors_name_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(text)
    with pytest.raises(ConfigFileError) as caught:
        _load(controller_parser(), ["serve", "--data-dir", "/x"], config, ("--data-dir",))
    assert str(caught.value).startswith(f"{config}: "), caught.value
    assert message in str(caught.value)


def test_agent_file_errors(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('proxy = "no-port"\n')
    with pytest.raises(ConfigFileError, match=r"agent.toml: proxy: expected HOST:PORT"):
        _load(agent_parser(), ["serve"], config, ())
    config.write_text('conda-channel = "https://one"\n')
    with pytest.raises(ConfigFileError, match=r"conda-channel: expected a list of strings"):
        _load(agent_parser(), ["serve"], config, ())


def test_required_settings_come_from_either_place(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"--data-dir: required \(or in a --config file\)"):
        _load(controller_parser(), ["serve"], None, ("--data-dir",))
    config = tmp_path / "agent.toml"
    config.write_text('state-dir = "/s"\n')
    with pytest.raises(ConfigFileError) as caught:
        _load(agent_parser(), ["serve"], config, ("--controller", "--state-dir"))
    assert str(caught.value) == f"--controller: required on the command line or in {config}"


def test_default_location_only_when_present(tmp_path: Path) -> None:
    default = tmp_path / "controller.toml"
    assert config_source(None, default) is None
    default.write_text("")
    assert config_source(None, default) == default
    assert config_source(tmp_path / "other.toml", default) == tmp_path / "other.toml"


def test_controller_process_reads_its_file(tmp_path: Path) -> None:
    """The real `studio-controller serve --config`: the file's ports, one overridden."""
    file_http, http, grpc, agents = free_port(), free_port(), free_port(), free_port()
    config = tmp_path / "controller.toml"
    config.write_text(
        f'data-dir = "{tmp_path / "data"}"\n'
        f'http = "127.0.0.1:{file_http}"\n'
        f'grpc = "127.0.0.1:{grpc}"\n'
        f'grpc-agents = "127.0.0.1:{agents}"\n'
    )
    log = (tmp_path / "controller.log").open("wb")
    proc = subprocess.Popen(
        [
            script("studio-controller"),
            "serve",
            "--config",
            str(config),
            "--http",
            f"127.0.0.1:{http}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        listening: set[int] = set()
        while time.monotonic() < deadline and listening != {http, grpc, agents}:
            assert proc.poll() is None, (tmp_path / "controller.log").read_text()
            for port in (http, grpc, agents):
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        listening.add(port)
            time.sleep(0.2)
        assert listening == {http, grpc, agents}, (tmp_path / "controller.log").read_text()
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", file_http)) != 0, "the flag overrides the file"
        assert (tmp_path / "data" / "admin-token").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.parametrize("daemon", ["controller", "agent"])
def test_readme_examples_are_valid(tmp_path: Path, daemon: str) -> None:
    """The README's example files load without a complaint."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    marker = f"```toml\n# /etc/studios/{daemon}.toml\n"
    assert marker in readme
    example = readme.split(marker, 1)[1].split("```", 1)[0]
    config = tmp_path / f"{daemon}.toml"
    config.write_text(example)
    if daemon == "controller":
        args = _load(controller_parser(), ["serve"], config, ("--data-dir",))
        assert args.data_dir == Path("/var/lib/studios-controller")
        assert args.agent_lost_seconds == 300.0
    else:
        required = ("--controller", "--token-file", "--compute-env", "--state-dir")
        args = _load(agent_parser(), ["serve"], config, required)
        assert args.proxy == ("0.0.0.0", 7070)
        assert args.conda_channel == ["https://conda.example.org/main"]
