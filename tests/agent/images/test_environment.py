"""Custom environment files (issue 15): read strictly, hashed by content, turned into a
Containerfile (agent/images/environment.py; pure, no podman)."""

from __future__ import annotations

import json

import pytest

from agent.images.environment import (
    EnvironmentFileError,
    EnvironmentSpec,
    containerfile,
    environment_hash,
    environment_reference,
    parse_environment,
    python_mismatch,
)

TEMPLATE_ID = "e478ef751209ac3182c1638e1814dd22fffb939e47b39e9b586953bd53d719d4"
OTHER_ID = "4884e500c709fed57afc4e9acd4ead69849a03ed6c650d8cd3b1bfd54ab1f872"

ENV = """\
name: analysis
channels:
  - conda-forge
dependencies:
  - python=3.11
  - pip
  - apt: [jq, curl=7.88.1-10+deb12u5]
  - pip:
      - tomli-w==1.0.0
      - Six>=1.16
      - requests[socks]>=2; python_version >= "3.8"
"""

SAME_REORDERED = """\
# the same environment, written differently
dependencies:
  - pip:
    - requests[socks] >= 2 ; python_version>="3.8"
    - six>=1.16     # case and spaces do not matter
    - tomli_w==1.0.0
  - apt:
    - curl=7.88.1-10+deb12u5
    - jq
  - pip
  - python=3.11
channels: [conda-forge]
name: another-name
"""


def _error(text: str) -> str:
    with pytest.raises(EnvironmentFileError) as info:
        parse_environment(text)
    return str(info.value)


def test_parses_conda_pip_and_apt() -> None:
    spec = parse_environment(ENV)
    assert spec == EnvironmentSpec(
        pip=('requests[socks]>=2; python_version >= "3.8"', "six>=1.16", "tomli-w==1.0.0"),
        apt=("curl=7.88.1-10+deb12u5", "jq"),
        conda=("pip", "python=3.11"),
        channels=("conda-forge",),
    )
    # python and pip come with the template image: nothing for a conda channel.
    assert spec.conda_to_install() == ()
    assert spec.wants_pip()
    assert python_mismatch(spec, "3.11.2") is None
    mismatch = python_mismatch(spec, "3.12.1")
    assert mismatch is not None and "'python=3.11'" in mismatch and "3.12.1" in mismatch


@pytest.mark.parametrize(
    ("version", "image", "ok"),
    [
        ("python", "3.11.2", True),
        ("python>=3.10", "3.11.2", True),
        ("python>=3.12", "3.11.2", False),
        ("python 3.11", "3.11.2", True),
        ("python==3.11.2", "3.11.2", True),
        ("python=3.10", "3.11.2", False),
        ("python>=3.9,<3.11", "3.11.2", False),
    ],
)
def test_python_version_against_the_image(version: str, image: str, ok: bool) -> None:
    spec = parse_environment(f"dependencies: [{json.dumps(version)}]")
    assert (python_mismatch(spec, image) is None) is ok


def test_not_yaml_names_line_and_column() -> None:
    message = _error("dependencies:\n  - pip: [six\n  - apt: [jq]\n")
    assert message == "not YAML: line 3 column 8: expected ',' or ']', but got ':'", message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- six\n- numpy\n", "line 1 column 1: an environment file is a mapping"),
        ("just a string\n", "an environment file is a mapping (name, channels, dependencies), not"),
        ("", "the environment file is empty"),
        ("# only a comment\n\n", "the environment file is empty"),
        ("name: x\n", "has no 'dependencies'"),
        ("dependencies: six\n", "line 1 column 15: 'dependencies' must be a list"),
        ("dependencies:\n  - 1.5\n", "line 2 column 5: a 'dependencies' entry is a conda package"),
        ("dependencies:\n  - pip: six\n", "line 2 column 10: 'pip' must be a list"),
        ("dependencies:\n  - pip: [1]\n", "line 2 column 11: a pip requirement must be a string"),
        ("channels: conda-forge\ndependencies: []\n", "'channels' must be a list"),
        ("name: [a]\ndependencies: []\n", "line 1 column 7: 'name' must be a string, not a list"),
    ],
)
def test_wrong_shapes_and_types(text: str, expected: str) -> None:
    assert expected in _error(text)


def test_unknown_keys_are_named() -> None:
    assert "line 2 column 1: unknown key 'dependences'" in _error("name: x\ndependences: [six]\n")
    message = _error("dependencies:\n  - conda: [numpy]\n")
    assert "line 2 column 5: unknown key 'conda' in 'dependencies'" in message
    assert "'variables' is not supported" in _error("dependencies: []\nvariables: {A: '1'}\n")
    # conda env export writes the exporting machine's prefix: ignored.
    assert parse_environment("dependencies: [python]\nprefix: /home/me/env\n").conda == ("python",)


@pytest.mark.parametrize(
    "entry",
    [
        "--index-url https://evil.example/simple",
        "-r requirements.txt",
        "-e .",
        "--extra-index-url=https://evil.example",
    ],
)
def test_pip_options_are_refused(entry: str) -> None:
    message = _error(f"dependencies:\n  - pip:\n    - {json.dumps(entry)}\n")
    assert "line 3 column 7: pip option" in message and "is not allowed" in message


@pytest.mark.parametrize(
    "entry",
    ["six\n--index-url https://evil.example", "six\r\n-e .", "six\x00"],
)
def test_newlines_in_a_package_are_refused(entry: str) -> None:
    assert "line break or control character" in _error(
        f"dependencies:\n  - pip: [{json.dumps(entry)}]\n"
    )
    assert "line break or control character" in _error(
        f"dependencies:\n  - apt: [{json.dumps(entry.lower())}]\n"
    )


@pytest.mark.parametrize(
    "entry",
    [
        "six @ https://evil.example/six-1.16.0-py2.py3-none-any.whl",
        "https://evil.example/six.tar.gz",
        "git+https://github.com/benjaminp/six",
        "six @ file:///etc/passwd",
    ],
)
def test_url_requirements_are_refused(entry: str) -> None:
    assert "names a URL" in _error(f"dependencies:\n  - pip: [{json.dumps(entry)}]\n")


@pytest.mark.parametrize(
    "entry",
    ["six; rm -rf /", "six`id`", "six$(id)", "six==1.0 \\"],
)
def test_shell_and_containerfile_characters_are_refused(entry: str) -> None:
    message = _error(f"dependencies:\n  - pip: [{json.dumps(entry)}]\n")
    assert "line 2 column 11:" in message, message


@pytest.mark.parametrize(
    "entry", ["Jq", "jq; id", "-o=Dpkg::Pre-Invoke=id", "j", "jq=", "jq 1.6", "jq\tx", "jq=1.6 x"]
)
def test_bad_apt_names_are_refused(entry: str) -> None:
    message = _error(f"dependencies:\n  - apt: [{json.dumps(entry)}]\n")
    assert message.startswith("line 2 column 11:"), message


@pytest.mark.parametrize("entry", ["conda-forge::numpy", "numpy[version='>=1']", "num py; id"])
def test_bad_conda_packages_are_refused(entry: str) -> None:
    assert _error(f"dependencies: [{json.dumps(entry)}]\n").startswith("line 1 column 16:")


def test_bad_python_version_is_refused() -> None:
    assert "python version '3.10|3.11' is not understood" in _error(
        "dependencies: ['python 3.10|3.11']\n"
    )


def test_hash_is_stable_under_order_comments_and_whitespace() -> None:
    a, b = parse_environment(ENV), parse_environment(SAME_REORDERED)
    assert a.canonical() == b.canonical()
    assert environment_hash(a, TEMPLATE_ID) == environment_hash(b, TEMPLATE_ID)
    # podman's ids with or without their algorithm are the same image.
    assert environment_hash(a, TEMPLATE_ID) == environment_hash(a, f"sha256:{TEMPLATE_ID}")


def test_hash_changes_with_content_and_template() -> None:
    spec = parse_environment(ENV)
    base = environment_hash(spec, TEMPLATE_ID)
    assert environment_hash(spec, OTHER_ID) != base
    more = parse_environment(ENV.replace("tomli-w==1.0.0", "tomli-w==1.1.0"))
    assert environment_hash(more, TEMPLATE_ID) != base
    # Channels are a priority order: their order counts.
    two = parse_environment("channels: [a, b]\ndependencies: [numpy]\n")
    swapped = parse_environment("channels: [b, a]\ndependencies: [numpy]\n")
    assert environment_hash(two, TEMPLATE_ID) != environment_hash(swapped, TEMPLATE_ID)
    # The operator's channels count where conda packages are installed, not elsewhere.
    assert environment_hash(two, TEMPLATE_ID, conda_channels=("http://c",)) != environment_hash(
        two, TEMPLATE_ID
    )
    assert environment_hash(spec, TEMPLATE_ID, conda_channels=("http://c",)) == base


def test_reference_names_template_and_hash() -> None:
    h = environment_hash(parse_environment(ENV), TEMPLATE_ID)
    for template in ("localhost/studios/jupyterlab:4.6-0.1", "studios/jupyterlab:4.6-0.1"):
        assert environment_reference(template, h) == f"localhost/studios-env/jupyterlab:{h[:16]}"
    with pytest.raises(ValueError, match="not an environment hash"):
        environment_reference("studios/jupyterlab:4.6-0.1", "not-hex")


def test_containerfile_keeps_the_template_and_quotes_everything() -> None:
    spec = parse_environment(ENV)
    h = environment_hash(spec, TEMPLATE_ID)
    text = containerfile(
        spec,
        template_image_id=TEMPLATE_ID,
        template_reference="localhost/studios/jupyterlab:4.6-0.1",
        user="1000:1000",
        env_hash=h,
        ca_path="/run/studios-build/ca.crt",
    )
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert instructions[0] == f"FROM {TEMPLATE_ID}"
    assert instructions[1].startswith(f'LABEL studios.env-hash="{h}"')
    assert [i.split()[0] for i in instructions] == ["FROM", "LABEL", "USER", "RUN", "USER", "RUN"]
    assert instructions[2] == "USER root" and instructions[4] == "USER 1000:1000"
    apt = json.loads(instructions[3].removeprefix("RUN "))
    assert apt[:2] == ["/bin/sh", "-c"] and "--no-install-recommends curl=" in apt[2]
    pip = json.loads(instructions[5].removeprefix("RUN "))
    assert pip[:4] == ["python3", "-m", "pip", "install"]
    assert pip[-3:] == list(spec.pip) and "--cert" in pip
    # No ENTRYPOINT, CMD, WORKDIR or ENV: FROM carries the template's.
    assert not any(i.split()[0] in ("ENTRYPOINT", "CMD", "WORKDIR", "ENV") for i in instructions)


def test_containerfile_of_pip_only_stays_the_templates_user() -> None:
    spec = parse_environment("dependencies: [{pip: [tomli-w]}]\n")
    text = containerfile(
        spec,
        template_image_id=TEMPLATE_ID,
        template_reference="localhost/studios/jupyterlab:4.6-0.1",
        user="1000:1000",
        env_hash=environment_hash(spec, TEMPLATE_ID),
    )
    assert "USER" not in text and "--cert" not in text
