"""Building studio images into the host's podman storage, and listing what a host has.

Builds run the podman CLI and mmdebstrap as subprocesses (an operator's command, not the
agent's event loop), one at a time per host (a lock file: two builds of one image would
race for its tag), each logged in full to `<log dir>/<name>.log` and reported line by line
to a callback (the CLI's progress display). Nothing is pulled from a registry:
`podman build --pull=never`, so a Containerfile FROM anything not already built here
fails at once.

Superseded images (a rebuild moves the tag) are left in storage, untagged: a running
session's root file system is an overlay of its image's layer directories, which podman
does not know about, so removing them here could pull the ground from under a session.
`studio-agent images list` shows them; `podman image prune` removes them when no session
of the old image runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.images.definitions import (
    CONNECT_DIR,
    DefinitionError,
    ImageDefinition,
    build_order,
    content_hash,
)
from agent.images.environment import LABEL_ENV_TEMPLATE

__all__ = [
    "LABEL_HASH",
    "LABEL_IMAGE",
    "BuildError",
    "BuildResult",
    "EventCallback",
    "build_images",
    "host_ca_bundle",
    "host_lock_path",
    "image_states",
    "inspect_image",
]

LABEL_HASH = "studios.build-hash"
LABEL_IMAGE = "studios.image"
# Where a Containerfile's RUN steps find the host's CA bundle (bound read-only):
# package managers reach the registries only if they trust what the host trusts.
BUILD_CA_PATH = "/run/studios-build/ca.crt"
_HOST_CA_CANDIDATES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
_HOST_APT_SOURCES = ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list")
_LOG_TAIL = 25

# (image name, event, text): event is "state" (what the build does now) or "line" (output).
EventCallback = Callable[[str, str, str], None]


class BuildError(AgentError):
    """A build failed; the message names the image and ends with its log's tail."""


@dataclass(slots=True)
class BuildResult:
    name: str
    reference: str
    # built | current (nothing changed, nothing built) | failed | skipped (a parent failed)
    status: str
    seconds: float = 0.0
    build_hash: str = ""
    image_id: str = ""
    size: int = 0
    message: str = ""
    log_path: str = ""

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in ("", None)}


def host_ca_bundle() -> str | None:
    return next((p for p in _HOST_CA_CANDIDATES if os.path.isfile(p)), None)


def _podman(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["podman", *args], capture_output=True, text=True, check=False, timeout=300
        )
    except FileNotFoundError:
        raise BuildError("podman is not installed (apt-get install podman)") from None


def inspect_image(reference: str) -> dict[str, Any] | None:
    """podman's view of an image in local storage, None when it is not there."""
    out = _podman("image", "inspect", reference)
    if out.returncode != 0:
        return None
    data = json.loads(out.stdout or "[]")
    return data[0] if data else None


def _foreign_image_id(reference: str) -> str:
    image = inspect_image(reference)
    if image is None:
        raise DefinitionError(
            f"image {reference} is not in this host's podman storage (builds never pull)"
        )
    return str(image["Id"])


def _labels(image: dict[str, Any]) -> dict[str, str]:
    labels = image.get("Labels") or (image.get("Config") or {}).get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


@contextlib.contextmanager
def _host_lock(path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _default_lock_path() -> Path:
    run_lock = Path("/run/lock")
    base = run_lock if os.access(run_lock, os.W_OK) else Path(tempfile.gettempdir())
    return base / "studios-images.lock"


def host_lock_path() -> Path:
    """The lock file that serialises image builds on this host: `studio-agent images
    build` and the agent's custom environments (agent.images.env_builder) take it."""
    return _default_lock_path()


def _run_logged(
    argv: Sequence[str], log_path: Path, on_line: Callable[[str], None], cwd: Path | None = None
) -> None:
    """Run `argv`, appending its output to the log and passing each line on; a non-zero
    exit raises BuildError with the log's tail."""
    tail: deque[str] = deque(maxlen=_LOG_TAIL)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                cwd=cwd,
            )
        except FileNotFoundError:
            raise BuildError(f"{argv[0]} is not installed") from None
        assert proc.stdout is not None
        with proc:
            for line in proc.stdout:
                log.write(line)
                line = line.rstrip()
                if line:
                    tail.append(line)
                    on_line(line)
        if proc.returncode != 0:
            log.write(f"exit status {proc.returncode}\n")
            raise BuildError(
                f"{shlex.join(argv[:2])} exited with status {proc.returncode}; "
                f"last lines of {log_path}:\n" + "\n".join(tail)
            )


def _build_mmdebstrap(
    d: ImageDefinition, build_hash: str, work: Path, log_path: Path, on_line: Callable[[str], None]
) -> None:
    if shutil.which("mmdebstrap") is None:
        raise BuildError(
            f"image {d.name}: mmdebstrap is not installed "
            "(apt-get install mmdebstrap; scripts/install does)"
        )
    s = d.settings
    tar = work / "rootfs.tar"
    argv = ["mmdebstrap", f"--variant={s.get('variant', 'minbase')}"]
    if s.get("include"):
        argv.append(f"--include={','.join(s['include'])}")
    argv += [f"--dpkgopt={opt}" for opt in s.get("dpkg_options", [])]
    if s.get("customize"):
        # mmdebstrap runs a hook with `sh -c HOOK exec ROOT`: the root is "$1".
        hook = shlex.quote(str((d.directory / s["customize"]).resolve()))
        argv.append(f'--customize-hook=sh {hook} "$1"')
    argv += [s["suite"], str(tar)]
    # The host's own apt sources: the mirror (and its proxy or snapshot) this host reaches.
    sources = s.get("sources") or next((p for p in _HOST_APT_SOURCES if os.path.isfile(p)), None)
    if sources:
        argv.append(str(sources))
    _run_logged(argv, log_path, on_line)
    imp = ["podman", "import"]
    for change in [
        *s.get("changes", []),
        f"LABEL {LABEL_HASH}={build_hash}",
        f"LABEL {LABEL_IMAGE}={d.name}",
    ]:
        imp += ["--change", change]
    _run_logged([*imp, str(tar), d.reference], log_path, on_line)


def _build_containerfile(
    d: ImageDefinition,
    parent_reference: str,
    build_hash: str,
    work: Path,
    log_path: Path,
    on_line: Callable[[str], None],
) -> None:
    context = work / "context"
    shutil.copytree(d.directory, context, symlinks=True)
    if d.connect:
        package = context / "studios_connect"
        package.mkdir()
        (package / "__init__.py").write_text(
            '"""The Studios connect glue, copied from the agent\'s runtime by the build."""\n'
        )
        for name in d.connect:
            shutil.copy2(CONNECT_DIR / name, package / name)
    argv = [
        "podman",
        "build",
        # The network the host has: package managers reach their registries.
        "--network=host",
        # Never a registry pull: FROM is the parent built here.
        "--pull=never",
        "--layers",
        "--file",
        str(context / "Containerfile"),
        "--build-arg",
        f"BASE={parent_reference}",
        "--label",
        f"{LABEL_HASH}={build_hash}",
        "--label",
        f"{LABEL_IMAGE}={d.name}",
        "--tag",
        d.reference,
    ]
    ca = host_ca_bundle()
    if ca:
        argv += [
            "--volume",
            f"{ca}:{BUILD_CA_PATH}:ro",
            "--build-arg",
            f"PIP_CERT={BUILD_CA_PATH}",
            "--build-arg",
            f"HOST_CA={BUILD_CA_PATH}",
        ]
    argv.append(str(context))
    _run_logged(argv, log_path, on_line)


def build_images(
    definitions: dict[str, ImageDefinition],
    names: Sequence[str],
    *,
    force: Sequence[str] = (),
    on_event: EventCallback | None = None,
    log_dir: Path | None = None,
    work_dir: Path | None = None,
    lock_path: Path | None = None,
) -> list[BuildResult]:
    """Build `names` and what they are built FROM, parents first, each only when its
    content hash differs from its image's label (or it is missing, or named in `force`).
    A failure stops the images built FROM it, not the others."""

    def emit(name: str, event: str, text: str) -> None:
        if on_event is not None:
            on_event(name, event, text)

    order = build_order(definitions, names)
    logs = log_dir or Path(tempfile.gettempdir()) / "studios-images"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, BuildResult] = {}
    memo: dict[str, str] = {}
    with _host_lock(
        lock_path or _default_lock_path(),
        lambda: emit(order[0], "state", "waiting for another image build on this host"),
    ):
        for name in order:
            d = definitions[name]
            parent = definitions.get(d.parent or "") if d.parent_is_definition else None
            if parent is not None and results[parent.name].status in ("failed", "skipped"):
                results[name] = BuildResult(
                    name, d.reference, "skipped", message=f"{parent.name} failed"
                )
                emit(name, "state", f"skipped: {parent.name} failed")
                continue
            results[name] = _build_one(definitions, d, memo, name in force, emit, logs, work_dir)
    return [results[n] for n in order]


def _build_one(
    definitions: dict[str, ImageDefinition],
    d: ImageDefinition,
    memo: dict[str, str],
    force: bool,
    emit: EventCallback,
    logs: Path,
    work_dir: Path | None,
) -> BuildResult:
    started = time.monotonic()
    log_path = logs / f"{d.name}.log"
    try:
        build_hash = content_hash(definitions, d.name, _foreign_image_id, memo)
    except DefinitionError as exc:
        emit(d.name, "state", f"failed: {exc}")
        return BuildResult(d.name, d.reference, "failed", message=str(exc))
    existing = inspect_image(d.reference)
    if existing is not None and not force and _labels(existing).get(LABEL_HASH) == build_hash:
        emit(d.name, "state", "current: nothing changed")
        return BuildResult(
            d.name,
            d.reference,
            "current",
            build_hash=build_hash,
            image_id=str(existing["Id"]),
            size=int(existing.get("Size") or 0),
        )
    emit(d.name, "state", f"building ({d.builder})")
    log_path.write_text(f"# {d.reference} ({d.builder}), build hash {build_hash}\n")
    # /var/tmp: a root file system tarball does not belong in a RAM-backed /tmp.
    scratch = work_dir or Path("/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir())
    try:
        with tempfile.TemporaryDirectory(prefix=f"studios-image-{d.name}-", dir=scratch) as tmp:
            if d.builder == "mmdebstrap":
                _build_mmdebstrap(
                    d, build_hash, Path(tmp), log_path, lambda t: emit(d.name, "line", t)
                )
            else:
                parent_ref = (
                    definitions[d.parent].reference
                    if d.parent_is_definition and d.parent
                    else str(d.parent)
                )
                _build_containerfile(
                    d,
                    parent_ref,
                    build_hash,
                    Path(tmp),
                    log_path,
                    lambda t: emit(d.name, "line", t),
                )
    except BuildError as exc:
        emit(d.name, "state", "failed")
        return BuildResult(
            d.name,
            d.reference,
            "failed",
            seconds=round(time.monotonic() - started, 1),
            build_hash=build_hash,
            message=f"image {d.name}: {exc}",
            log_path=str(log_path),
        )
    built = inspect_image(d.reference) or {}
    seconds = round(time.monotonic() - started, 1)
    emit(d.name, "state", f"built in {seconds:g} s")
    return BuildResult(
        d.name,
        d.reference,
        "built",
        seconds=seconds,
        build_hash=build_hash,
        image_id=str(built.get("Id", "")),
        size=int(built.get("Size") or 0),
        log_path=str(log_path),
    )


def image_states(definitions: dict[str, ImageDefinition]) -> list[dict[str, Any]]:
    """What this host has: every definition's image (current, stale: built from other
    definitions, or missing) and every other image these builds made (superseded ones
    left untagged by a rebuild), with sizes."""
    out = _podman("images", "--format", "json", "--filter", f"label={LABEL_IMAGE}")
    if out.returncode != 0:
        raise BuildError(f"podman images failed: {out.stderr.strip()}")
    present = json.loads(out.stdout or "[]")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    memo: dict[str, str] = {}
    for d in definitions.values():
        row: dict[str, Any] = {"name": d.name, "reference": d.reference}
        if d.template:
            row["template"] = d.template
        image = inspect_image(d.reference)
        try:
            wanted = content_hash(definitions, d.name, _foreign_image_id, memo)
        except DefinitionError as exc:
            wanted = ""
            row["message"] = str(exc)
        if image is None:
            row["state"] = "missing"
        else:
            seen.add(str(image["Id"]))
            row["state"] = "current" if _labels(image).get(LABEL_HASH) == wanted else "stale"
            row["imageId"] = str(image["Id"])[:12]
            row["size"] = int(image.get("Size") or 0)
            row["created"] = str(image.get("Created") or "")
        rows.append(row)
    for item in present:
        image_id = str(item.get("Id") or "")
        if image_id in seen:
            continue
        labels = {str(k): str(v) for k, v in (item.get("Labels") or {}).items()}
        names = item.get("Names") or []
        # A custom environment's image (agent.images.env_builder) carries its template's
        # labels and one of its own.
        env_template = labels.get(LABEL_ENV_TEMPLATE)
        state = "superseded" if not names else "other"
        if env_template:
            state = "environment" if names else "environment layer"
        rows.append(
            {
                "name": labels.get(LABEL_IMAGE, ""),
                **({"template": env_template} if env_template else {}),
                "reference": names[0] if names else "<none>",
                "state": state,
                "imageId": image_id[:12],
                "size": int(item.get("Size") or 0),
                "created": str(item.get("CreatedAt") or item.get("Created") or ""),
            }
        )
    return rows
