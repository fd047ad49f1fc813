"""A studio's custom environment (issue 15): the conda environment file a user gives as
`condaEnvironment`, read strictly, hashed by content and turned into the Containerfile of
an image derived FROM the studio's template image. Pure: no subprocess, no network;
`agent.images.env_builder` runs the build.

What the file may hold (YAML, one mapping):

- `name`: a string, ignored (the image is named by its content);
- `channels`: a list of conda channel names or URLs. They are part of the environment's
  hash, but a build installs conda packages only from the channels the operator
  configured (the agent's `conda_channels`): these hosts reach no public conda channel,
  and which servers a build contacts is the operator's decision;
- `dependencies`: a list whose items are
  - a string: a conda package (`numpy`, `numpy=1.26`, `numpy>=1.2,<2`, `numpy 1.26.*`).
    `python` (with or without a version) and `pip` are what the template image already
    has: the build checks the version against the image's `python3 --version` instead of
    installing one. Any other conda package needs a configured conda channel;
  - `{pip: [...]}`: PEP 508 requirements installed from PyPI (`six==1.16.0`,
    `requests[socks]>=2`). No URLs, no options (`--index-url`, `-r file`, `-e .`): the file
    may name packages, never change where or how they are fetched;
  - `{apt: [...]}`: Debian packages (`jq`, `jq=1.6-2.1`) from the host's apt sources.
    This key is this project's extension of conda's format (conda itself knows only
    `pip` there): a file using it is for Studios.
- `prefix` (what `conda env export` writes: the exporting machine's path) is ignored;
  `variables` is refused (a studio's environment variables are not the image's business),
  and so is every other key.

Every error is an EnvironmentFileError whose message names the line and column (1-based) and
what is wrong there. An empty file (or only comments) is refused: the caller treats an
empty `condaEnvironment` as "no environment" before it gets here.

The hash covers the packages in a canonical form (names normalised, lists sorted and
without duplicates: pip, apt and conda resolve a set, so order carries no meaning; the
channels keep their order, which is their priority), the template image's id, the
configured channels when conda packages are asked for, and ENV_BUILDER_VERSION. The same
environment on the same template image therefore names the same derived image, whatever
its comments, whitespace or order.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Final

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from agent.errors import AgentError

__all__ = [
    "ENV_BUILDER_VERSION",
    "ENV_REPOSITORY",
    "LABEL_ENV_HASH",
    "LABEL_ENV_TEMPLATE",
    "EnvironmentFileError",
    "EnvironmentSpec",
    "containerfile",
    "environment_hash",
    "environment_reference",
    "parse_environment",
    "python_mismatch",
]

# Bumped whenever the generated Containerfile changes meaning: every environment then
# builds anew instead of reusing an image built the old way.
ENV_BUILDER_VERSION: Final = "1"
ENV_REPOSITORY: Final = "localhost/studios-env"
LABEL_ENV_HASH: Final = "studios.env-hash"
LABEL_ENV_TEMPLATE: Final = "studios.env-template"

# Conda packages the template image provides instead of a channel.
_PROVIDED = frozenset({"python", "pip"})
_MAX_TEXT = 64 * 1024
_MAX_PACKAGES = 500
_MAX_PACKAGE_LEN = 200
_TOP_KEYS = ("name", "channels", "dependencies", "prefix", "variables")

_APT = re.compile(r"[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?")
# What a PEP 508 requirement without a URL needs (markers included): nothing a shell, a
# Containerfile or pip's option parser could take for something else.
_PIP_CHARS = re.compile(r"[A-Za-z0-9 ._\-\[\],<>=!~;()'\"*+]+")
_CONDA = re.compile(
    r"(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]*)"
    r"(?:(?:\s+|(?=[<>=!~]))(?P<version>[0-9A-Za-z.*,<>=!~_+-][0-9A-Za-z.*,<>=!~_+| -]*))?"
)
_CHANNEL = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*|https?://[A-Za-z0-9._~:/%-]+)")
_REFERENCE = re.compile(r"[a-z0-9][a-z0-9._/:-]*(?::[A-Za-z0-9_.-]+)?(?:@sha256:[0-9a-f]{64})?")
_IMAGE_ID = re.compile(r"(sha256:)?[0-9a-f]{12,64}")

_STR = "tag:yaml.org,2002:str"
_KIND = {
    "tag:yaml.org,2002:null": "nothing (null)",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:int": "a number",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:timestamp": "a date",
}


class EnvironmentFileError(AgentError):
    """The environment file is not one this agent builds; the message says where and why."""


@dataclass(frozen=True, slots=True)
class EnvironmentSpec:
    """What an environment file asks for, each list canonical (see the module's doc)."""

    pip: tuple[str, ...]
    apt: tuple[str, ...]
    conda: tuple[str, ...]
    channels: tuple[str, ...]

    def canonical(self) -> str:
        return json.dumps(
            {
                "apt": list(self.apt),
                "channels": list(self.channels),
                "conda": list(self.conda),
                "pip": list(self.pip),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    def conda_to_install(self) -> tuple[str, ...]:
        """The conda packages a channel must provide (not python or pip)."""
        return tuple(p for p in self.conda if _conda_name(p) not in _PROVIDED)

    def python_specifier(self) -> SpecifierSet | None:
        """The Python version the file asks for, as a PEP 440 specifier; None: any."""
        specs = [_python_specifier(p) for p in self.conda if _conda_name(p) == "python"]
        found = [s for s in specs if s is not None]
        if not found:
            return None
        combined = SpecifierSet()
        for s in found:
            combined &= s
        return combined

    def wants_pip(self) -> bool:
        return bool(self.pip) or any(_conda_name(p) == "pip" for p in self.conda)


def _where(node: yaml.Node) -> str:
    mark = node.start_mark
    return f"line {mark.line + 1} column {mark.column + 1}"


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _KIND.get(node.tag, f"a value tagged {node.tag}")


def _fail(node: yaml.Node, what: str) -> EnvironmentFileError:
    return EnvironmentFileError(f"{_where(node)}: {what}")


def _string(node: yaml.Node, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.tag != _STR:
        raise _fail(node, f"{what} must be a string, not {_kind(node)}")
    value = str(node.value)
    if not value.strip():
        raise _fail(node, f"{what} is empty")
    if len(value) > _MAX_PACKAGE_LEN:
        raise _fail(node, f"{what} is longer than {_MAX_PACKAGE_LEN} characters")
    if any(c in value for c in "\n\r\t\0"):
        raise _fail(node, f"{what} {value!r} holds a line break or control character")
    return value


def _list(node: yaml.Node, what: str) -> list[yaml.Node]:
    if not isinstance(node, yaml.SequenceNode):
        raise _fail(node, f"{what} must be a list, not {_kind(node)}")
    if len(node.value) > _MAX_PACKAGES:
        raise _fail(node, f"{what} has more than {_MAX_PACKAGES} entries")
    return list(node.value)


def _pip(node: yaml.Node) -> str:
    text = _string(node, "a pip requirement").strip()
    if text.startswith("-"):
        raise _fail(
            node,
            f"pip option {text.split()[0]!r} is not allowed: list package requirements only "
            "(where and how packages are fetched is the agent's setting)",
        )
    if "://" in text or "@" in text:
        raise _fail(
            node, f"pip requirement {text!r} names a URL: only packages from PyPI are installed"
        )
    if not _PIP_CHARS.fullmatch(text):
        raise _fail(node, f"pip requirement {text!r} holds characters a requirement never has")
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        raise _fail(node, f"{text!r} is not a PEP 508 requirement: {exc}") from None
    if req.url:
        raise _fail(node, f"pip requirement {text!r} names a URL")
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return f"{canonicalize_name(req.name)}{extras}{req.specifier}{marker}"


def _apt(node: yaml.Node) -> str:
    text = _string(node, "a Debian package").strip()
    if not _APT.fullmatch(text):
        raise _fail(
            node,
            f"{text!r} is not a Debian package name (lower-case letters, digits, '+', '-', "
            "'.', optionally '=VERSION')",
        )
    return text


def _conda_name(package: str) -> str:
    m = _CONDA.fullmatch(package)
    return m.group("name").lower() if m else package


def _python_specifier(package: str) -> SpecifierSet | None:
    m = _CONDA.fullmatch(package)
    version = (m.group("version") or "").replace(" ", "") if m else ""
    if not version:
        return None
    if "|" in version:
        raise InvalidSpecifier(version)
    if version[0].isdigit():
        version = "=" + version
    if version.startswith("=") and not version.startswith("=="):
        # conda's `python=3.11` means any 3.11.x, like PEP 440's `==3.11.*`.
        bare = version[1:].removesuffix(".*").removesuffix("*")
        version = f"=={bare}.*"
    return SpecifierSet(version)


def _conda(node: yaml.Node) -> str:
    text = _string(node, "a conda package").strip()
    if "::" in text:
        raise _fail(
            node,
            f"conda package {text!r} names its channel: list channels under 'channels' instead",
        )
    m = _CONDA.fullmatch(text)
    if m is None:
        raise _fail(node, f"{text!r} is not a conda package specification")
    name, version = m.group("name").lower(), (m.group("version") or "").replace(" ", "")
    # `numpy>=1.2` as conda writes it; a bare version keeps its space (`numpy 1.26.*`).
    canonical = f"{name} {version}" if version[:1].isdigit() else f"{name}{version}"
    if name == "python":
        try:
            _python_specifier(canonical)
        except InvalidSpecifier:
            raise _fail(
                node, f"python version {version!r} is not understood (e.g. python=3.11)"
            ) from None
    return canonical


def _dependencies(node: yaml.Node, pip: set[str], apt: set[str], conda: set[str]) -> None:
    for item in _list(node, "'dependencies'"):
        if isinstance(item, yaml.MappingNode):
            for key_node, value in item.value:
                key = _string(key_node, "a key in 'dependencies'")
                if key == "pip":
                    pip.update(_pip(n) for n in _list(value, "'pip'"))
                elif key == "apt":
                    apt.update(_apt(n) for n in _list(value, "'apt'"))
                else:
                    raise _fail(
                        key_node,
                        f"unknown key {key!r} in 'dependencies': a mapping there holds "
                        "'pip' (PyPI packages) or 'apt' (Debian packages)",
                    )
        elif isinstance(item, yaml.ScalarNode) and item.tag == _STR:
            conda.add(_conda(item))
        else:
            raise _fail(
                item,
                "a 'dependencies' entry is a conda package (a string) or a mapping with "
                f"'pip' or 'apt', not {_kind(item)}",
            )


def parse_environment(text: str) -> EnvironmentSpec:
    """The environment file `text`, checked (see the module's doc for what it may hold)."""
    if len(text) > _MAX_TEXT:
        raise EnvironmentFileError(f"the environment file is larger than {_MAX_TEXT // 1024} KiB")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        raise EnvironmentFileError(f"not YAML: {where}{exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise EnvironmentFileError(f"not YAML: {exc}") from None
    if root is None:
        raise EnvironmentFileError("the environment file is empty: it lists no dependencies")
    if not isinstance(root, yaml.MappingNode):
        raise _fail(
            root,
            f"an environment file is a mapping (name, channels, dependencies), not {_kind(root)}",
        )
    pip: set[str] = set()
    apt: set[str] = set()
    conda: set[str] = set()
    channels: list[str] = []
    seen: set[str] = set()
    for key_node, value in root.value:
        key = _string(key_node, "a top-level key")
        if key in seen:
            raise _fail(key_node, f"{key!r} appears twice")
        seen.add(key)
        if key == "name":
            _string(value, "'name'")
        elif key == "prefix":
            # The exporting machine's path (conda env export writes it): meaningless here.
            continue
        elif key == "channels":
            for n in _list(value, "'channels'"):
                channel = _string(n, "a channel").strip()
                if not _CHANNEL.fullmatch(channel):
                    raise _fail(n, f"{channel!r} is not a conda channel name or http(s) URL")
                if channel not in channels:
                    channels.append(channel)
        elif key == "dependencies":
            _dependencies(value, pip, apt, conda)
        elif key == "variables":
            raise _fail(
                key_node,
                "'variables' is not supported: an environment here installs packages only",
            )
        else:
            raise _fail(
                key_node,
                f"unknown key {key!r} (an environment file has {', '.join(_TOP_KEYS[:3])})",
            )
    if "dependencies" not in seen:
        raise _fail(root, "the environment file has no 'dependencies'")
    return EnvironmentSpec(
        pip=tuple(sorted(pip)),
        apt=tuple(sorted(apt)),
        conda=tuple(sorted(conda)),
        channels=tuple(channels),
    )


def environment_hash(
    spec: EnvironmentSpec, template_image_id: str, *, conda_channels: tuple[str, ...] = ()
) -> str:
    """The hex SHA-256 naming `spec` built on the template image `template_image_id`;
    `conda_channels` (the operator's) count only when conda packages are installed."""
    payload = {
        "builder": ENV_BUILDER_VERSION,
        "template": template_image_id.removeprefix("sha256:"),
        "environment": spec.canonical(),
        "condaChannels": list(conda_channels) if spec.conda_to_install() else [],
    }
    return hashlib.sha256(
        json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def environment_reference(template_reference: str, env_hash: str) -> str:
    """Where the derived image is tagged: `localhost/studios-env/<template's image
    name>:<first 16 hex digits of the hash>` (the hash includes the template's id, so two
    versions of a template never share a tag)."""
    repository = template_reference.rsplit("@", 1)[0]
    last = repository.rsplit("/", 1)[-1]
    name = last.split(":", 1)[0] or "image"
    if not re.fullmatch(r"[0-9a-f]{16,64}", env_hash):
        raise ValueError(f"not an environment hash: {env_hash!r}")
    return f"{ENV_REPOSITORY}/{name}:{env_hash[:16]}"


def python_mismatch(spec: EnvironmentSpec, image_python: str) -> str | None:
    """Why the template's Python (`3.11.2`) does not satisfy the file's `python` entry;
    None when it does."""
    wanted = spec.python_specifier()
    if wanted is None:
        return None
    try:
        version = Version(image_python)
    except InvalidVersion:
        return f"the template image's python3 reports an unreadable version {image_python!r}"
    if wanted.contains(version, prereleases=True):
        return None
    asked = ", ".join(p for p in spec.conda if _conda_name(p) == "python")
    return (
        f"the environment asks for {asked!r} but the template image has Python {version} "
        "(a studio's Python is its template's: choose a template with that Python or drop "
        "the version)"
    )


def _exec_form(argv: list[str]) -> str:
    # JSON exec form: no shell parses the packages (apt's step needs one, and gets only
    # names that matched _APT).
    return json.dumps(argv)


def containerfile(
    spec: EnvironmentSpec,
    *,
    template_image_id: str,
    template_reference: str,
    user: str,
    env_hash: str,
    ca_path: str | None = None,
    conda_command: str | None = None,
    conda_channels: tuple[str, ...] = (),
) -> str:
    """The Containerfile of `spec`'s image FROM the template image (by id: the image the
    hash was computed for, whatever its tag points at meanwhile). ENTRYPOINT, CMD,
    WORKDIR and ENV come with FROM; the last USER is the template's own `user`."""
    if not _IMAGE_ID.fullmatch(template_image_id):
        raise ValueError(f"not an image id: {template_image_id!r}")
    if not _REFERENCE.fullmatch(template_reference):
        raise ValueError(f"not an image reference: {template_reference!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]*", user):
        raise ValueError(f"not an image user: {user!r}")
    lines = [
        f"# The Studios environment {env_hash} on {template_reference}",
        "# (generated by agent/images/env_builder.py).",
        f"FROM {template_image_id.removeprefix('sha256:')}",
        # First, so that every intermediate image of this build carries it too: a build
        # killed halfway leaves working containers that the next build recognises.
        f'LABEL {LABEL_ENV_HASH}="{env_hash}" {LABEL_ENV_TEMPLATE}="{template_reference}"',
    ]
    if spec.apt or spec.conda_to_install():
        lines.append("USER root")
    if spec.apt:
        ca_opt = f" -o Acquire::https::CAInfo={ca_path}" if ca_path else ""
        script = (
            f"apt-get{ca_opt} update"
            f" && DEBIAN_FRONTEND=noninteractive apt-get{ca_opt} install -y"
            f" --no-install-recommends {' '.join(spec.apt)}"
            " && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/*"
            " /var/log/dpkg.log"
        )
        lines.append(f"RUN {_exec_form(['/bin/sh', '-c', script])}")
    conda = spec.conda_to_install()
    if conda:
        if conda_command is None or not conda_channels:
            raise ValueError("conda packages need a conda command and channels")
        argv = [conda_command, "install", "--yes", "--override-channels"]
        for channel in conda_channels:
            argv += ["--channel", channel]
        lines.append(f"RUN {_exec_form(argv + list(conda))}")
    if spec.apt or conda:
        if user:
            lines.append(f"USER {user}")
    if spec.pip:
        argv = [
            "python3",
            "-m",
            "pip",
            "install",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
        ]
        if ca_path:
            argv += ["--cert", ca_path]
        lines.append(f"RUN {_exec_form([*argv, *spec.pip])}")
    return "\n".join(lines) + "\n"
