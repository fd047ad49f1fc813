"""Which documents a REST answer must satisfy, and the check (issue 14).

Upstream services are written against Seqera's public API, so an answer must be one the
**reference** describes wherever the operation exists there (`tests/reference/`, copies of
`../shared/reference/`), and one our own `controller/openapi.yaml` documents in every case
(our document says exactly what we send, our additions included):

- our document: the path and method are documented, the status is one of the operation's
  responses, and a JSON body validates against its schema;
- the reference: when it has the operation (the same method on a path of the same structure:
  parameter names may differ) and documents a JSON body for the status, the body validates
  against that schema. A status the reference does not list (our 401, 413, some 409s) or lists
  without a body (its 403s) is checked against our document only.

Both with OpenAPI 3.0 semantics for a response (`nullable`, `writeOnly` properties absent) and
format checking (`date-time`, `int32`, `int64`): a `null` where the schema does not declare the
field nullable, an enum value the schema does not list or a date in another format fails.
Properties of our own beside the reference's pass unless its schema forbids them
(`additionalProperties: false`).

The one overlay on the reference, applied when it is loaded: our compute-environment platform
`studio-agent` is added to every platform enum of the reference (those listing
`local-platform`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from openapi_schema_validator import OAS30ReadValidator, oas30_format_checker

__all__ = [
    "OUR_PLATFORM",
    "OWN_SPEC_PATH",
    "REFERENCE_PATHS",
    "Checked",
    "ReferenceOperation",
    "check_response",
    "reference_operation",
    "reference_spec",
    "schema_errors",
]

ROOT = Path(__file__).resolve().parent.parent
OWN_SPEC_PATH = ROOT / "controller" / "openapi.yaml"
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
REFERENCE_PATHS = (
    REFERENCE_DIR / "seqera-studios-openapi.yaml",
    REFERENCE_DIR / "seqera-orgs-openapi.yaml",
)
OUR_PLATFORM = "studio-agent"
# A platform enum of the reference is recognised by one of its members.
_PLATFORM_MARKER = "local-platform"
_PARAMETER = re.compile(r"\{[^}]+\}")


@dataclass(frozen=True)
class Checked:
    """What an answer was checked against."""

    # Our document's path template, e.g. /studios/{sessionId}.
    template: str
    # The reference document's file name when it has the operation and a body schema for the
    # status, else None.
    reference: str | None


@dataclass(frozen=True)
class ReferenceOperation:
    # The reference document's file name, its path template and the operation.
    document: str
    template: str
    operation: dict[str, Any]


@dataclass(frozen=True)
class _Document:
    name: str
    spec: dict[str, Any]
    # Path structure (parameters as "{}") -> the document's template.
    by_structure: dict[str, str]


def _structure(template: str) -> str:
    return _PARAMETER.sub("{}", template)


def _add_our_platform(node: Any) -> None:
    """The overlay: `studio-agent` in every enum that lists the reference's platforms."""
    if isinstance(node, dict):
        enum = node.get("enum")
        if isinstance(enum, list) and _PLATFORM_MARKER in enum and OUR_PLATFORM not in enum:
            enum.append(OUR_PLATFORM)
        for value in node.values():
            _add_our_platform(value)
    elif isinstance(node, list):
        for value in node:
            _add_our_platform(value)


def _load(path: Path, *, overlay: bool) -> _Document:
    spec = yaml.safe_load(path.read_text())
    if overlay:
        _add_our_platform(spec)
    return _Document(
        name=path.name,
        spec=spec,
        by_structure={_structure(t): t for t in spec["paths"]},
    )


@functools.cache
def _own() -> tuple[_Document, list[tuple[re.Pattern[str], str]]]:
    document = _load(OWN_SPEC_PATH, overlay=False)
    routes = []
    for template in document.spec["paths"]:
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        routes.append((re.compile(f"^{pattern}$"), template))
    # Literal paths (/studios/validate) before templated ones (/studios/{sessionId}).
    routes.sort(key=lambda r: r[1].count("{"))
    return document, routes


@functools.cache
def _references() -> tuple[_Document, ...]:
    return tuple(_load(path, overlay=True) for path in REFERENCE_PATHS)


def reference_operation(method: str, template: str) -> ReferenceOperation | None:
    """The reference's operation for `method` on our `template` (any parameter names), or
    None when it has none: an addition of ours."""
    for document in _references():
        ref_template = document.by_structure.get(_structure(template))
        if ref_template is None:
            continue
        operation = document.spec["paths"][ref_template].get(method.lower())
        if operation is not None:
            return ReferenceOperation(document.name, ref_template, operation)
    return None


def reference_spec(name: str) -> dict[str, Any]:
    """A reference document by file name, as the checks use it (the overlay applied)."""
    return next(d.spec for d in _references() if d.name == name)


def _response(spec: dict[str, Any], operation: dict[str, Any], status: int) -> Any:
    responses = operation["responses"]
    response = responses.get(str(status)) or responses.get("default")
    if response is not None and "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    return response


def schema_errors(spec: dict[str, Any], schema: dict[str, Any], body: Any) -> Iterator[str]:
    """Where and why `body` does not validate against `schema` (of `spec`) as a response."""
    root = {**schema, "components": spec.get("components", {})}
    validator = OAS30ReadValidator(root, format_checker=oas30_format_checker)
    for error in sorted(validator.iter_errors(body), key=str):
        yield f"{'/'.join(map(str, error.absolute_path)) or '(body)'}: {error.message}"


def _assert_valid(where: str, spec: dict[str, Any], schema: dict[str, Any], body: Any) -> None:
    errors = list(schema_errors(spec, schema, body))
    assert not errors, f"{where}: " + "; ".join(errors[:3])


def check_response(method: str, path: str, status: int, content_type: str, body: Any) -> Checked:
    """Assert that the answer is one our document and, where it has the operation, the
    reference describe (see the module's docstring)."""
    own, routes = _own()
    path = urlsplit(path).path
    template = next((t for rx, t in routes if rx.match(path)), None)
    assert template is not None, f"{method} {path}: path not in openapi.yaml"
    operation = own.spec["paths"][template].get(method.lower())
    assert operation is not None, f"{method} {template}: method not in openapi.yaml"
    response = _response(own.spec, operation, status)
    assert response is not None, f"{method} {template}: status {status} not in openapi.yaml"
    if content_type != "application/json":
        return Checked(template, None)
    schema = response.get("content", {}).get("application/json", {}).get("schema")
    assert schema is not None, f"{method} {template} {status}: JSON body not documented"
    where = f"{method} {template} {status}: body does not match"
    _assert_valid(f"{where} openapi.yaml", own.spec, schema, body)
    found = reference_operation(method, template)
    if found is None:
        return Checked(template, None)
    name = found.document
    ref_spec = reference_spec(name)
    ref_response = _response(ref_spec, found.operation, status)
    ref_schema = (
        None
        if ref_response is None
        else ref_response.get("content", {}).get("application/json", {}).get("schema")
    )
    if ref_schema is None:
        return Checked(template, None)
    _assert_valid(f"{where} the reference ({name})", ref_spec, ref_schema, body)
    return Checked(template, name)
