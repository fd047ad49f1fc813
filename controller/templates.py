"""The catalogue of Studio templates, and custom image references.

A create request names its template by `dataStudioToolUrl`: a `repository`
of the catalogue, or any image reference (a custom template, `customImage`).
Template image tags follow ``<tool_version>-[u<update>]-<connect_version>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from controller.errors import BadRequest

__all__ = [
    "CATALOGUE",
    "DEFAULT_TEMPLATE",
    "IMAGE_REFERENCE",
    "ResolvedTemplate",
    "Template",
    "image_name",
    "is_newer_version",
    "resolve_template",
    "template_version",
]


@dataclass(frozen=True, slots=True)
class Template:
    repository: str
    tool: str
    # recommended | deprecated | experimental | unsupported
    status: str
    icon: str | None = None


CATALOGUE: tuple[Template, ...] = (
    Template(repository="studios/python-http:3.11-0.1", tool="python-http", status="recommended"),
    # The local runtime runs it from PyPI (`pip install studios[jupyter]`, agent/jupyter_tool.py).
    Template(repository="studios/jupyterlab:4.6-0.1", tool="jupyter", status="recommended"),
)

DEFAULT_TEMPLATE = next(t for t in CATALOGUE if t.status == "recommended")

# The distribution reference grammar, simplified: [registry[:port]/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_REGISTRY = rf"(?:{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?/)"
IMAGE_REFERENCE = re.compile(
    rf"^(?:{_REGISTRY})?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)


@dataclass(frozen=True, slots=True)
class ResolvedTemplate:
    repository: str
    tool: str
    status: str | None
    icon: str | None
    custom: bool


def resolve_template(tool_url: str | None) -> ResolvedTemplate:
    """The template a create request asks for; BadRequest if it is no image reference."""
    if tool_url is None or not tool_url.strip():
        t = DEFAULT_TEMPLATE
        return ResolvedTemplate(t.repository, t.tool, t.status, t.icon, custom=False)
    tool_url = tool_url.strip()
    for t in CATALOGUE:
        if t.repository == tool_url:
            return ResolvedTemplate(t.repository, t.tool, t.status, t.icon, custom=False)
    if len(tool_url) > 512 or not IMAGE_REFERENCE.match(tool_url):
        raise BadRequest(f"dataStudioToolUrl: not a template or an image reference: {tool_url!r}")
    # The tool of a custom image: the last path component of its name.
    name = tool_url.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    tool = last.split(":", 1)[0]
    return ResolvedTemplate(tool_url, tool, None, None, custom=True)


def image_name(repository: str) -> str:
    """The image reference without tag and digest."""
    name = repository.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def template_version(repository: str) -> tuple[tuple[int, ...], int, tuple[int, ...]] | None:
    """(tool version, update, connect version) of a ``<tool>-[u<n>-]<connect>`` tag."""
    name = repository.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        return None
    parts = last.split(":", 1)[1].split("-")
    try:
        tool = tuple(int(p) for p in parts[0].split("."))
        update = 0
        rest = parts[1:]
        if rest and rest[0].startswith("u"):
            update = int(rest[0][1:])
            rest = rest[1:]
        connect = tuple(int(p) for p in rest[0].split(".")) if rest else ()
    except (ValueError, IndexError):
        return None
    return tool, update, connect


def is_newer_version(old: ResolvedTemplate | str, new: ResolvedTemplate) -> bool:
    """True when `new` is a later version of the same tool as `old` (a template migration)."""
    old_repo = old if isinstance(old, str) else old.repository
    if image_name(old_repo) != image_name(new.repository):
        return False
    old_v, new_v = template_version(old_repo), template_version(new.repository)
    return old_v is not None and new_v is not None and new_v > old_v
