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
    "resolve_template",
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
