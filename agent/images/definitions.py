"""Build definitions of studio images: `images/<name>/image.toml` and the files beside it.

Two builders:

- `mmdebstrap`: a root file system made by mmdebstrap from the host's apt sources
  (`[mmdebstrap]`: suite, variant, include, dpkg_options, customize, changes), imported
  with `podman import` (no registry);
- `containerfile`: `podman build` of the directory's `Containerfile`, FROM `from` (another
  definition's name, passed as the build argument BASE, or an image reference already in
  the host's storage), with `connect` (file names of agent/runtime/) copied into the build
  context as the package `studios_connect/`.

An image's content hash covers everything it is built from: its directory (names, bytes,
executable bits), its connect files, the host files it reads (`host_inputs`), its parent's
hash (or a foreign parent's image id) and the builder's own version. It is stored in the
image as the label `studios.build-hash`, so a build with nothing changed builds nothing.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import AgentError

__all__ = [
    "BUILDERS",
    "BUILDER_VERSION",
    "CONNECT_DIR",
    "DefinitionError",
    "ImageDefinition",
    "build_order",
    "content_hash",
    "default_definitions_dir",
    "load_definitions",
    "resolve_names",
]

# Bumped when the builder changes what it makes from the same definition: every image
# is then rebuilt once.
BUILDER_VERSION = "1"
BUILDERS = ("mmdebstrap", "containerfile")
DEFINITION_FILE = "image.toml"
# Where the connect glue comes from: the agent's own tool files (read as files, not
# imported: the images package stands beside the runtime, not above it).
CONNECT_DIR = Path(__file__).resolve().parents[1] / "runtime"


class DefinitionError(AgentError):
    """A build definition is missing, malformed or names what does not exist."""


@dataclass(frozen=True, slots=True)
class ImageDefinition:
    name: str
    directory: Path
    reference: str
    builder: str
    # The catalogue repository this image serves (e.g. studios/jupyterlab:4.6-0.1).
    template: str | None = None
    # Another definition's name, or an image reference present in the host's storage.
    parent: str | None = None
    connect: tuple[str, ...] = ()
    # Absolute paths on the host the build reads (the host's own CAs): in the hash too.
    host_inputs: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def parent_is_definition(self) -> bool:
        # References have a registry, a path or a tag; definition names are bare words.
        return self.parent is not None and not any(c in self.parent for c in "/:@")


def default_definitions_dir() -> Path:
    """$STUDIOS_IMAGES_DIR, else the repository's `images/` beside the agent package."""
    env = os.environ.get("STUDIOS_IMAGES_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "images"


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DefinitionError(f"{where}: expected a list of strings")
    return tuple(value)


def _load_one(directory: Path) -> ImageDefinition:
    path = directory / DEFINITION_FILE
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DefinitionError(f"{path}: {exc}") from None
    reference = data.get("reference")
    builder = data.get("builder")
    if not isinstance(reference, str) or not reference:
        raise DefinitionError(f"{path}: 'reference' (the image's name:tag) is required")
    if builder not in BUILDERS:
        raise DefinitionError(f"{path}: 'builder' must be one of {', '.join(BUILDERS)}")
    template = data.get("template")
    parent = data.get("from")
    if template is not None and not isinstance(template, str):
        raise DefinitionError(f"{path}: 'template' must be a string")
    if parent is not None and not isinstance(parent, str):
        raise DefinitionError(f"{path}: 'from' must be a string")
    connect = _str_list(data.get("connect", []), f"{path}: connect")
    for name in connect:
        if "/" in name or not (CONNECT_DIR / name).is_file():
            raise DefinitionError(f"{path}: connect file {name!r} is not in {CONNECT_DIR}")
    host_inputs = _str_list(data.get("host_inputs", []), f"{path}: host_inputs")
    if not all(os.path.isabs(p) for p in host_inputs):
        raise DefinitionError(f"{path}: host_inputs must be absolute paths")
    if builder == "containerfile":
        if parent is None:
            raise DefinitionError(f"{path}: a containerfile image needs 'from'")
        if not (directory / "Containerfile").is_file():
            raise DefinitionError(f"{path}: no Containerfile beside it")
        settings: dict[str, Any] = {}
    else:
        found = data.get("mmdebstrap")
        if not isinstance(found, dict) or not isinstance(found.get("suite"), str):
            raise DefinitionError(f"{path}: [mmdebstrap] with a 'suite' is required")
        settings = found
        for key in ("include", "dpkg_options", "changes"):
            _str_list(settings.get(key, []), f"{path}: mmdebstrap.{key}")
        hook = settings.get("customize")
        if hook is not None and not (isinstance(hook, str) and (directory / hook).is_file()):
            raise DefinitionError(f"{path}: mmdebstrap.customize names no file beside it")
    return ImageDefinition(
        name=directory.name,
        directory=directory,
        reference=reference,
        builder=str(builder),
        template=template,
        parent=parent,
        connect=connect,
        host_inputs=host_inputs,
        settings=settings,
    )


def load_definitions(root: Path) -> dict[str, ImageDefinition]:
    """Every `<root>/<name>/image.toml`, checked: parents exist and form no cycle."""
    if not root.is_dir():
        raise DefinitionError(
            f"no image definitions at {root} (pass --definitions DIR or set STUDIOS_IMAGES_DIR)"
        )
    found = {
        d.name: _load_one(d)
        for d in sorted(root.iterdir())
        if d.is_dir() and (d / DEFINITION_FILE).is_file()
    }
    for d in found.values():
        if d.parent_is_definition and d.parent not in found:
            raise DefinitionError(f"image {d.name}: 'from' names no definition: {d.parent!r}")
    for d in found.values():
        build_order(found, [d.name])  # raises on a cycle
    return found


def resolve_names(definitions: dict[str, ImageDefinition], wanted: Iterable[str]) -> list[str]:
    """Definition names for what an operator typed: a name, a reference or a template."""
    names: list[str] = []
    for item in wanted:
        match = [
            d.name
            for d in definitions.values()
            if item in (d.name, d.reference, d.template)
            or (d.template is not None and item == d.template.split(":", 1)[0])
        ]
        if not match:
            known = ", ".join(sorted(definitions))
            raise DefinitionError(f"no image definition for {item!r} (known: {known})")
        names.extend(m for m in match if m not in names)
    return names


def build_order(definitions: dict[str, ImageDefinition], wanted: Iterable[str]) -> list[str]:
    """`wanted` and every definition they are built FROM, parents first."""
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise DefinitionError(f"image definitions build FROM each other: {cycle}")
        visiting.append(name)
        d = definitions[name]
        if d.parent_is_definition and d.parent is not None:
            visit(d.parent)
        visiting.pop()
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def content_hash(
    definitions: dict[str, ImageDefinition],
    name: str,
    foreign_image_id: Callable[[str], str],
    _memo: dict[str, str] | None = None,
) -> str:
    """The sha256 of everything image `name` is built from (see the module's docstring).
    `foreign_image_id` gives the id of a parent that is an image reference, not a definition."""
    memo = {} if _memo is None else _memo
    if name in memo:
        return memo[name]
    d = definitions[name]
    h = hashlib.sha256()

    def part(label: str, data: bytes) -> None:
        # Length-prefixed, so no two different inputs hash alike by concatenation.
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)

    part("builder", BUILDER_VERSION.encode())
    part("reference", d.reference.encode())
    for path in sorted(p for p in d.directory.rglob("*") if p.is_file()):
        rel = path.relative_to(d.directory).as_posix()
        part(f"file:{rel}:{'x' if os.access(path, os.X_OK) else '-'}", path.read_bytes())
    for connect in d.connect:
        part(f"connect:{connect}", (CONNECT_DIR / connect).read_bytes())
    for host_input in d.host_inputs:
        root = Path(host_input)
        found = sorted(root.rglob("*")) if root.is_dir() else [root] if root.exists() else []
        part(f"host:{host_input}", str(len(found)).encode())
        for path in found:
            if path.is_file():
                part(f"host-file:{path}", path.read_bytes())
    if d.parent is not None:
        if d.parent_is_definition:
            part("parent", content_hash(definitions, d.parent, foreign_image_id, memo).encode())
        else:
            part("parent-image", foreign_image_id(d.parent).encode())
    memo[name] = h.hexdigest()
    return memo[name]
