"""`studio-agent images build|list` (agent/images, issue 15) with real podman builds of small
definitions FROM the offline busybox test image: a second build with nothing changed
builds nothing; a changed definition rebuilds it and what is built FROM it, not its
parent; the connect glue goes into the build context; bad definitions are refused naming
what is wrong (those without podman)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cli
from agent.images.builder import LABEL_HASH, build_images, inspect_image
from agent.images.definitions import (
    CONNECT_DIR,
    DefinitionError,
    build_order,
    content_hash,
    default_definitions_dir,
    load_definitions,
    resolve_names,
)
from tests.integration import require

IMAGE = os.environ.get("STUDIOS_TEST_IMAGE", "localhost/studios/busybox-httpd:1.36-0.1")


def _podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=False)


def _write(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def _definitions(root: Path, tag: str) -> dict[str, str]:
    """Two images: `parent` FROM the busybox image, `child` FROM `parent` with the glue."""
    refs = {n: f"localhost/studios-test/{tag}-{n}:1-0.1" for n in ("parent", "child")}
    _write(
        root / "parent",
        {
            "image.toml": f'reference = "{refs["parent"]}"\nbuilder = "containerfile"\n'
            f'from = "{IMAGE}"\n',
            "Containerfile": "ARG BASE\nFROM ${BASE}\nCOPY hello.txt /hello.txt\n",
            "hello.txt": "one\n",
        },
    )
    _write(
        root / "child",
        {
            "image.toml": f'reference = "{refs["child"]}"\nbuilder = "containerfile"\n'
            'from = "parent"\ntemplate = "studios/child:1-0.1"\nconnect = ["tool_guard.py"]\n',
            "Containerfile": "ARG BASE\nFROM ${BASE}\nCOPY studios_connect /opt/connect\n"
            "COPY extra.txt /extra.txt\nUSER 1000:1000\n",
            "extra.txt": "a\n",
        },
    )
    return refs


@pytest.fixture(name="built")
def built_fixture(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    require(os.geteuid() == 0, "image builds go to root's podman storage: run as root")
    require(_podman("version").returncode == 0, "podman is not usable here")
    require(_podman("image", "exists", IMAGE).returncode == 0, f"{IMAGE} (scripts/podman-setup)")
    refs = _definitions(tmp_path / "images", uuid.uuid4().hex[:8])
    yield tmp_path / "images", refs
    # This test's images, and the ones its rebuilds superseded (untagged, labelled with
    # these definitions' names, which no real image uses).
    for ref in refs.values():
        _podman("rmi", "-f", ref)
    for name in ("child", "parent"):
        out = _podman(
            "images", "-q", "--filter", "dangling=true", "--filter", f"label=studios.image={name}"
        )
        for image_id in out.stdout.split():
            _podman("rmi", image_id)


def _build(root: Path, tmp: Path, *names: str) -> dict[str, str]:
    results = build_images(
        load_definitions(root),
        list(names) or ["child"],
        log_dir=tmp / "logs",
        lock_path=tmp / "lock",
    )
    assert not [r for r in results if r.status == "failed"], results
    return {r.name: r.status for r in results}


def test_second_build_builds_nothing_and_a_change_rebuilds_what_depends_on_it(
    built: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, refs = built
    assert _build(root, tmp_path) == {"parent": "built", "child": "built"}
    first = {n: (inspect_image(r) or {})["Id"] for n, r in refs.items()}
    # The glue is in the image, and the image's user is kept.
    out = _podman("run", "--rm", "--entrypoint", "cat", refs["child"], "/opt/connect/tool_guard.py")
    assert out.stdout == (CONNECT_DIR / "tool_guard.py").read_text()
    assert (inspect_image(refs["child"]) or {})["Config"]["User"] == "1000:1000"

    # Nothing changed: nothing built, the same images.
    assert _build(root, tmp_path) == {"parent": "current", "child": "current"}
    assert {n: (inspect_image(r) or {})["Id"] for n, r in refs.items()} == first

    # The child's definition changed: only the child.
    (root / "child" / "extra.txt").write_text("b\n")
    assert _build(root, tmp_path) == {"parent": "current", "child": "built"}
    assert (inspect_image(refs["parent"]) or {})["Id"] == first["parent"]
    assert (inspect_image(refs["child"]) or {})["Id"] != first["child"]

    # The parent changed: both, parent first.
    (root / "parent" / "hello.txt").write_text("two\n")
    assert _build(root, tmp_path) == {"parent": "built", "child": "built"}
    out = _podman("run", "--rm", "--entrypoint", "cat", refs["child"], "/hello.txt")
    assert out.stdout == "two\n"
    # The label holds the hash each build was made from.
    assert (inspect_image(refs["child"]) or {})["Labels"][LABEL_HASH]


def test_cli_build_and_list(
    built: tuple[Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, refs = built
    args = ["--definitions", str(root), "--json"]
    # By template name: the child and what it is built FROM.
    assert cli.main(["images", "build", "studios/child", *args]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["status"]) for r in results] == [
        ("parent", "built"),
        ("child", "built"),
    ]
    assert cli.main(["images", "build", *args]) == 0
    assert {r["status"] for r in json.loads(capsys.readouterr().out)} == {"current"}
    assert cli.main(["images", "list", *args]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out) if r["name"] in refs}
    assert rows["child"]["state"] == rows["parent"]["state"] == "current"
    assert rows["child"]["template"] == "studios/child:1-0.1" and rows["child"]["size"] > 0
    (root / "child" / "extra.txt").write_text("changed\n")
    assert cli.main(["images", "list", *args]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out) if r["name"] in refs}
    assert rows["child"]["state"] == "stale" and rows["parent"]["state"] == "current"


def test_a_failed_build_names_the_image_and_skips_what_is_built_from_it(
    built: tuple[Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _refs = built
    (root / "parent" / "Containerfile").write_text("ARG BASE\nFROM ${BASE}\nRUN exit 3\n")
    code = cli.main(["images", "build", "--definitions", str(root), "--json", "child"])
    assert code == 1
    results = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert (
        results["parent"]["status"] == "failed" and "image parent" in results["parent"]["message"]
    )
    assert "exit" in results["parent"]["message"] and results["parent"]["log_path"]
    assert results["child"]["status"] == "skipped"


def test_the_repository_definitions_load() -> None:
    definitions = load_definitions(default_definitions_dir())
    assert definitions["jupyterlab"].reference == "localhost/studios/jupyterlab:4.6-0.1"
    assert definitions["jupyterlab"].template == "studios/jupyterlab:4.6-0.1"
    assert build_order(definitions, ["jupyterlab"]) == ["base", "jupyterlab"]
    assert resolve_names(definitions, ["studios/jupyterlab:4.6-0.1"]) == ["jupyterlab"]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a": 'builder = "containerfile"\nfrom = "b"\n'}, "'reference'"),
        ({"a": 'reference = "x/a:1"\nbuilder = "docker"\n'}, "'builder' must be one of"),
        ({"a": 'reference = "x/a:1"\nbuilder = "containerfile"\nfrom = "nope"\n'}, "'nope'"),
        (
            {
                "a": 'reference = "x/a:1"\nbuilder = "containerfile"\nfrom = "b"\n',
                "b": 'reference = "x/b:1"\nbuilder = "containerfile"\nfrom = "a"\n',
            },
            "a -> b -> a",
        ),
        ({"a": 'reference = "x/a:1"\nbuilder = "containerfile"\nfrom = "b"\n[oops'}, "image.toml"),
        (
            {
                "a": 'reference = "x/a:1"\nbuilder = "containerfile"\nfrom = "x/y:1"\n'
                'connect = ["../cli.py"]\n'
            },
            "connect file",
        ),
    ],
)
def test_bad_definitions_are_refused_naming_the_fault(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    for name, text in files.items():
        _write(tmp_path / name, {"image.toml": text, "Containerfile": "FROM x\n"})
    with pytest.raises(DefinitionError) as refused:
        load_definitions(tmp_path)
    assert expected in str(refused.value)
    with pytest.raises(DefinitionError, match="no image definition for 'nothing'"):
        resolve_names({}, ["nothing"])


def test_the_hash_covers_the_definition_the_glue_and_host_inputs(tmp_path: Path) -> None:
    host_ca = tmp_path / "host-ca"
    _write(host_ca, {"a.crt": "one"})
    _write(
        tmp_path / "defs" / "x",
        {
            "image.toml": 'reference = "x/x:1"\nbuilder = "containerfile"\nfrom = "x/base:1"\n'
            f'connect = ["tool_guard.py"]\nhost_inputs = ["{host_ca}"]\n',
            "Containerfile": "FROM x\n",
        },
    )

    def digest() -> str:
        return content_hash(load_definitions(tmp_path / "defs"), "x", lambda ref: "id-" + ref)

    first = digest()
    assert digest() == first
    (host_ca / "a.crt").write_text("two")
    second = digest()
    assert second != first
    (tmp_path / "defs" / "x" / "Containerfile").write_text("FROM y\n")
    assert digest() not in (first, second)
