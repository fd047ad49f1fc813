"""The version of the connect contract, and which versions of it are still supported.

The connect contract is what a studio image and the agent agree on (docs/contract-notes.md):
the tool listens on `$CONNECT_TOOL_PORT`, believes only requests carrying
`$CONNECT_PROXY_SECRET` as `X-Studios-Proxy-Secret`, reads the user from `X-Studios-User`.
A template image's tag ends with the version of the contract it speaks:
``<tool_version>-[u<update>-]<connect_version>``.

Seqera supports the current version of Connect and the two minor versions before it
(seqera-manage-studio-sessions.md, "Migrate a Studio"); so do we: an image of an older
minor version, of another major version, or of a version newer than this code speaks is
unsupported. Change `CONNECT_VERSION` here, and only here, when the contract changes: the
controller's template catalogue and the images' tags follow it.
"""

from __future__ import annotations

import re

__all__ = [
    "CONNECT_VERSION",
    "SUPPORTED_PREVIOUS_MINORS",
    "TagVersion",
    "connect_version_problem",
    "format_version",
    "parse_connect_version",
    "tag_version",
]

# (major, minor) of the contract this code speaks.
CONNECT_VERSION: tuple[int, int] = (0, 1)
# How many minor versions before CONNECT_VERSION are still accepted.
SUPPORTED_PREVIOUS_MINORS = 2


def format_version(version: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in version)


def parse_connect_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of ``"0.1"``; None if `text` is not two dot-separated numbers."""
    parts = text.split(".")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def connect_version_problem(
    version: tuple[int, ...], current: tuple[int, int] = CONNECT_VERSION
) -> str | None:
    """Why an image speaking `version` is unsupported by code speaking `current` (None: it
    is supported)."""
    if len(version) < 2:
        return f"connect version {format_version(version) or '(none)'} is not major.minor"
    major, minor = version[0], version[1]
    oldest = max(0, current[1] - SUPPORTED_PREVIOUS_MINORS)
    supported = (
        f"connect {format_version(current)} is current, {current[0]}.{oldest} to "
        f"{format_version(current)} are supported"
    )
    if major != current[0]:
        return f"connect version {format_version(version)} is of another major version: {supported}"
    if minor > current[1]:
        return (
            f"connect version {format_version(version)} is newer than the current one: {supported}"
        )
    if minor < oldest:
        return (
            f"connect version {format_version(version)} is older than the "
            f"{SUPPORTED_PREVIOUS_MINORS} minor versions before the current one: {supported}"
        )
    return None


# (tool version, update, connect version) of a template image's tag.
TagVersion = tuple[tuple[int, ...], int, tuple[int, ...]]
_TAG = re.compile(
    r"^(?P<tool>[0-9]+(?:\.[0-9]+)*)(?:-u(?P<update>[0-9]+))?-(?P<connect>[0-9]+\.[0-9]+)$"
)


def tag_version(reference: str) -> TagVersion | None:
    """The versions in an image reference's ``<tool>-[u<n>-]<connect>`` tag, strictly (a
    connect version of major.minor, nothing else in the tag); None for any other tag."""
    last = reference.split("@", 1)[0].rsplit("/", 1)[-1]
    if ":" not in last:
        return None
    match = _TAG.match(last.split(":", 1)[1])
    connect = parse_connect_version(match["connect"]) if match else None
    if match is None or connect is None:
        return None
    tool = tuple(int(p) for p in match["tool"].split("."))
    return tool, int(match["update"] or 0), connect
