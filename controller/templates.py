"""The catalogue of Studio templates (data an operator edits), and custom image references.

A create request names its template by `dataStudioToolUrl`: a `repository` of the
catalogue, or any image reference (a custom template, `customImage`). Template image tags
follow ``<tool_version>-[u<update>-]<connect_version>``.

The catalogue is a YAML file the controller loads at start (`studio-controller serve
--templates FILE`; default: controller/templates.yaml, shipped with the package). A broken
file stops the controller with the reason, naming the entry. Statuses follow Seqera's
lifecycle (seqera-manage-studio-sessions.md, "Migrate a Studio"), computed here rather than
written by hand so that adding a newer version deprecates the older ones by itself:

- an entry marked `unsupported`, or whose connect version is outside the window of
  `studios_shared.connect_contract` (the current minor version and the two before it):
  `unsupported`, refused at start with the reason;
- an entry marked `experimental`: `experimental` (starts, with a warning);
- otherwise, per tool: the newest version (tool version, update, connect version)
  `recommended`, the older ones `deprecated` (starts, with a warning naming the
  recommended one).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controller.errors import BadRequest
from studios_shared.connect_contract import (
    CONNECT_VERSION,
    connect_version_problem,
    format_version,
    tag_version,
)

__all__ = [
    "IMAGE_REFERENCE",
    "PACKAGED_CATALOGUE",
    "Catalogue",
    "CatalogueError",
    "ResolvedTemplate",
    "Template",
    "default_catalogue",
    "image_name",
    "is_newer_version",
    "load_catalogue",
    "parse_catalogue",
    "template_version",
]

# The catalogue shipped with the controller (package data).
PACKAGED_CATALOGUE = Path(__file__).with_name("templates.yaml")

RECOMMENDED = "recommended"
DEPRECATED = "deprecated"
EXPERIMENTAL = "experimental"
UNSUPPORTED = "unsupported"
# What an operator may write; recommended and deprecated follow from the versions.
_MARKS = (EXPERIMENTAL, UNSUPPORTED)
_FIELDS = ("repository", "tool", "status", "icon", "description")
_TOOL = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

# The distribution reference grammar, simplified: [registry[:port]/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_REGISTRY = rf"(?:{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?/)"
IMAGE_REFERENCE = re.compile(
    rf"^(?:{_REGISTRY})?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)

Version = tuple[tuple[int, ...], int, tuple[int, ...]]


class CatalogueError(ValueError):
    """The catalogue file is not usable; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Template:
    repository: str
    tool: str
    # (tool version, update, connect version) from the tag.
    version: Version
    # recommended | deprecated | experimental | unsupported
    status: str
    icon: str | None = None
    description: str | None = None
    # Why it is unsupported, or the warning a start of it carries (deprecated,
    # experimental); None for a recommended template.
    note: str | None = None


@dataclass(frozen=True, slots=True)
class ResolvedTemplate:
    repository: str
    tool: str
    status: str | None
    icon: str | None
    custom: bool


class Catalogue:
    """The templates the controller offers, with their computed statuses."""

    def __init__(self, templates: Iterable[Template], source: str = "<catalogue>") -> None:
        self.templates: tuple[Template, ...] = tuple(templates)
        self.source = source
        self._by_repository = {t.repository: t for t in self.templates}

    def get(self, repository: str) -> Template | None:
        return self._by_repository.get(repository)

    @property
    def default(self) -> Template | None:
        """What a create without `dataStudioToolUrl` gets: the first recommended entry."""
        return next((t for t in self.templates if t.status == RECOMMENDED), None)

    def recommended(self, tool: str) -> Template | None:
        return next((t for t in self.templates if t.tool == tool and t.status == RECOMMENDED), None)

    def resolve(self, tool_url: str | None) -> ResolvedTemplate:
        """The template a create request asks for; BadRequest if it is no image reference."""
        if tool_url is None or not tool_url.strip():
            t = self.default
            if t is None:
                raise BadRequest(
                    "dataStudioToolUrl: required, the template catalogue has no recommended "
                    "template to default to"
                )
            return ResolvedTemplate(t.repository, t.tool, t.status, t.icon, custom=False)
        tool_url = tool_url.strip()
        entry = self.get(tool_url)
        if entry is not None:
            return ResolvedTemplate(
                entry.repository, entry.tool, entry.status, entry.icon, custom=False
            )
        if len(tool_url) > 512 or not IMAGE_REFERENCE.match(tool_url):
            raise BadRequest(
                f"dataStudioToolUrl: not a template or an image reference: {tool_url!r}"
            )
        # The tool of a custom image: the last path component of its name.
        name = tool_url.split("@", 1)[0]
        last = name.rsplit("/", 1)[-1]
        tool = last.split(":", 1)[0]
        return ResolvedTemplate(tool_url, tool, None, None, custom=True)

    def status(self, repository: str) -> str | None:
        entry = self.get(repository)
        return entry.status if entry else None

    def start_refusal(self, repository: str) -> str | None:
        """Why a session of this template must not start; None if it may (custom images may)."""
        entry = self.get(repository)
        if entry is None or entry.status != UNSUPPORTED:
            return None
        return entry.note

    def start_warning(self, repository: str) -> str | None:
        """What a session of a deprecated or experimental template says in its status."""
        entry = self.get(repository)
        if entry is None or entry.status not in (DEPRECATED, EXPERIMENTAL):
            return None
        return entry.note

    def migration_target(self, old: str, new: ResolvedTemplate) -> bool:
        """True when a clone of a studio on `old` may move to `new`: a newer version of
        the same tool (by the catalogue's `tool` for catalogue templates, so a studio
        may move to the same tool's image of another repository; by image name otherwise)."""
        old_entry, new_entry = self.get(old), self.get(new.repository)
        if old_entry is not None and new_entry is not None:
            return old_entry.tool == new_entry.tool and new_entry.version > old_entry.version
        return is_newer_version(old, new)


def build_catalogue(
    entries: Iterable[Mapping[str, Any]],
    *,
    source: str = "<catalogue>",
    connect_version: tuple[int, int] = CONNECT_VERSION,
) -> Catalogue:
    """Validate entries and compute their statuses; CatalogueError naming the entry."""
    parsed: list[tuple[dict[str, Any], Version, str | None]] = []
    seen: set[str] = set()
    for index, raw in enumerate(entries):
        where = f"{source}: templates[{index}]"
        if not isinstance(raw, Mapping):
            raise CatalogueError(f"{where}: expected a mapping, got {type(raw).__name__}")
        repository = raw.get("repository")
        if isinstance(repository, str):
            where += f" ({repository})"
        unknown = sorted(str(k) for k in raw if k not in _FIELDS)
        if unknown:
            raise CatalogueError(
                f"{where}: unknown field(s) {', '.join(unknown)} (expected: {', '.join(_FIELDS)})"
            )
        if not isinstance(repository, str) or not repository:
            raise CatalogueError(f"{where}: repository: required, an image reference")
        if len(repository) > 512 or not IMAGE_REFERENCE.match(repository):
            raise CatalogueError(f"{where}: repository: not an image reference")
        if repository in seen:
            raise CatalogueError(f"{where}: repository: listed twice")
        seen.add(repository)
        version = tag_version(repository)
        if version is None:
            raise CatalogueError(
                f"{where}: repository: the tag must be <tool_version>-[u<update>-]"
                "<connect_version>, e.g. 4.6-0.1 or 4.6-u2-0.1 (numbers only; the connect "
                "version is major.minor)"
            )
        tool = raw.get("tool")
        if not isinstance(tool, str) or not _TOOL.match(tool):
            raise CatalogueError(
                f"{where}: tool: required, lower-case letters, digits, '.', '_' or '-'"
            )
        mark = raw.get("status")
        if mark is not None and mark not in _MARKS:
            raise CatalogueError(
                f"{where}: status: expected {' or '.join(_MARKS)} (recommended and deprecated "
                f"follow from the versions), got {mark!r}"
            )
        for field in ("icon", "description"):
            value = raw.get(field)
            if value is not None and not isinstance(value, str):
                raise CatalogueError(f"{where}: {field}: expected a string")
        problem = connect_version_problem(version[2], connect_version)
        parsed.append(
            (
                dict(raw),
                version,
                f"marked unsupported in {source}" if mark == UNSUPPORTED else problem,
            )
        )

    # Per tool, the newest version of the templates that may still be recommended.
    newest: dict[str, Version] = {}
    for raw, version, unsupported in parsed:
        if unsupported is None and raw.get("status") != EXPERIMENTAL:
            tool = raw["tool"]
            newest[tool] = max(newest.get(tool, version), version)
    statuses: list[str] = []
    for raw, version, unsupported in parsed:
        if unsupported is not None:
            statuses.append(UNSUPPORTED)
        elif raw.get("status") == EXPERIMENTAL:
            statuses.append(EXPERIMENTAL)
        elif version == newest[raw["tool"]]:
            # Equal versions under two repositories (say one image per runtime) are both
            # the newest.
            statuses.append(RECOMMENDED)
        else:
            statuses.append(DEPRECATED)
    recommended: dict[str, list[str]] = {}
    for (raw, _, _), status in zip(parsed, statuses, strict=True):
        if status == RECOMMENDED:
            recommended.setdefault(raw["tool"], []).append(raw["repository"])
    templates: list[Template] = []
    for (raw, version, unsupported), status in zip(parsed, statuses, strict=True):
        repository, tool = raw["repository"], raw["tool"]
        # What to migrate to: the recommended version of the same image if there is one
        # (the same runtime's), else the tool's first recommended entry.
        candidates = recommended.get(tool, [])
        target = next(
            (r for r in candidates if image_name(r) == image_name(repository)),
            candidates[0] if candidates else None,
        )
        note: str | None = None
        if status == UNSUPPORTED:
            assert unsupported is not None
            note = f"template {repository} is unsupported: {unsupported}"
            if target is not None:
                note += f"; add this studio as new with {target} (recommended) to migrate its data"
        elif status == DEPRECATED:
            note = (
                f"template {repository} is deprecated: {target} is the recommended version "
                f"of {tool} (tool version {format_version(newest[tool][0])}); add this studio "
                "as new with it to migrate"
            )
        elif status == EXPERIMENTAL:
            note = f"template {repository} is experimental: not supported, not for production use"
        templates.append(
            Template(
                repository=repository,
                tool=tool,
                version=version,
                status=status,
                icon=raw.get("icon"),
                description=raw.get("description"),
                note=note,
            )
        )
    return Catalogue(templates, source)


def parse_catalogue(
    text: str, *, source: str = "<catalogue>", connect_version: tuple[int, int] = CONNECT_VERSION
) -> Catalogue:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{source}: not YAML: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"templates"}:
        raise CatalogueError(f"{source}: expected a mapping with one key, 'templates'")
    entries = data.get("templates")
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise CatalogueError(f"{source}: templates: expected a list of entries")
    return build_catalogue(entries, source=source, connect_version=connect_version)


def load_catalogue(
    path: Path | None = None, *, connect_version: tuple[int, int] = CONNECT_VERSION
) -> Catalogue:
    """The catalogue in `path` (default: the packaged one); CatalogueError if unusable."""
    path = path or PACKAGED_CATALOGUE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogueError(f"{path}: cannot read the template catalogue: {exc}") from None
    return parse_catalogue(text, source=str(path), connect_version=connect_version)


@functools.cache
def default_catalogue() -> Catalogue:
    """The packaged catalogue, for services built without one (tests, tools)."""
    return load_catalogue()


def image_name(repository: str) -> str:
    """The image reference without tag and digest."""
    name = repository.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def template_version(repository: str) -> Version | None:
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
    """True when `new` is a later version of the same image as `old` (a template migration)."""
    old_repo = old if isinstance(old, str) else old.repository
    if image_name(old_repo) != image_name(new.repository):
        return False
    old_v, new_v = template_version(old_repo), template_version(new.repository)
    return old_v is not None and new_v is not None and new_v > old_v
