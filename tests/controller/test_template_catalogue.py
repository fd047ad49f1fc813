"""The template catalogue as data (issue 15): the file the controller loads, its validation,
the statuses computed from it (Seqera's lifecycle and the connect-version window), and what
they do: an unsupported template is refused at start with the reason, a deprecated or
experimental one starts with a warning in its status, a clone may move to a newer version of
the same tool only. Custom images are unaffected.
"""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from studios.agent.v1 import agent_pb2 as pb

from controller import cli
from controller.templates import (
    PACKAGED_CATALOGUE,
    CatalogueError,
    load_catalogue,
    parse_catalogue,
)
from studios_shared.connect_contract import CONNECT_VERSION
from tests.conftest import ControllerHarness
from tests.controller.test_roles import add_checkpoint
from tests.fake_agent import FakeAgent

# Connect 0.1 is current (studios_shared.connect_contract): 0.0 is still supported, 0.2 is
# newer than the controller speaks.
CATALOGUE = """
templates:
  - repository: studios/python-http:3.11-0.1
    tool: python-http
  - repository: localhost/studios/jupyterlab:4.6-0.1
    tool: jupyter
    icon: https://example.org/jupyter.svg
    description: the newest JupyterLab
  # The same version under another repository (say, the local runtime's): also recommended.
  - repository: studios/jupyterlab:4.6-0.1
    tool: jupyter
  - repository: localhost/studios/jupyterlab:4.5-u2-0.1
    tool: jupyter
  - repository: localhost/studios/jupyterlab:4.4-0.0
    tool: jupyter
  - repository: localhost/studios/jupyterlab:4.7-0.1
    tool: jupyter
    status: experimental
  - repository: localhost/studios/jupyterlab:3.6-0.1
    tool: jupyter
    status: unsupported
  - repository: localhost/studios/vscode:1.90-0.2
    tool: vscode
"""

EXPECTED = {
    "studios/python-http:3.11-0.1": "recommended",
    "localhost/studios/jupyterlab:4.6-0.1": "recommended",
    "studios/jupyterlab:4.6-0.1": "recommended",
    "localhost/studios/jupyterlab:4.5-u2-0.1": "deprecated",
    "localhost/studios/jupyterlab:4.4-0.0": "deprecated",
    "localhost/studios/jupyterlab:4.7-0.1": "experimental",
    "localhost/studios/jupyterlab:3.6-0.1": "unsupported",
    "localhost/studios/vscode:1.90-0.2": "unsupported",
}
DEPRECATED = "localhost/studios/jupyterlab:4.5-u2-0.1"
EXPERIMENTAL = "localhost/studios/jupyterlab:4.7-0.1"
UNSUPPORTED = "localhost/studios/jupyterlab:3.6-0.1"
RECOMMENDED = "localhost/studios/jupyterlab:4.6-0.1"


# ------------------------------------------------------------ the file


def test_packaged_catalogue() -> None:
    catalogue = load_catalogue()
    assert PACKAGED_CATALOGUE.name == "templates.yaml"
    statuses = {t.repository: t.status for t in catalogue.templates}
    assert statuses == {
        "studios/python-http:3.11-0.1": "recommended",
        "studios/jupyterlab:4.6-0.1": "recommended",
        "studios/code-server:4.139-0.1": "recommended",
        "studios/r-ide:4.2-0.1": "recommended",
        "studios/xpra:3.1-0.1": "recommended",
    }
    # A create without dataStudioToolUrl: the first recommended entry, as before.
    assert catalogue.default is not None
    assert catalogue.default.repository == "studios/python-http:3.11-0.1"
    # What ships is startable: bumping CONNECT_VERSION past its window needs new images.
    for t in catalogue.templates:
        assert t.status != "unsupported", t
        assert t.version[2][0] == CONNECT_VERSION[0]


def test_images_built_by_the_project_are_in_the_catalogue() -> None:
    """An image definition naming a template (images/*/image.toml) names one users can pick."""
    repositories = {t.repository for t in load_catalogue().templates}
    for definition in sorted((Path(__file__).parents[2] / "images").glob("*/image.toml")):
        template = tomllib.loads(definition.read_text()).get("template")
        if template is not None:
            assert template in repositories, f"{definition}: {template} is not in the catalogue"


def test_statuses_are_computed() -> None:
    catalogue = parse_catalogue(CATALOGUE)
    assert {t.repository: t.status for t in catalogue.templates} == EXPECTED
    deprecated = catalogue.get(DEPRECATED)
    assert deprecated is not None and deprecated.version == ((4, 5), 2, (0, 1))
    warning = catalogue.start_warning(DEPRECATED)
    assert warning is not None and "deprecated" in warning and RECOMMENDED in warning
    warning = catalogue.start_warning(EXPERIMENTAL)
    assert warning is not None and "experimental" in warning
    assert catalogue.start_warning(RECOMMENDED) is None
    assert catalogue.start_refusal(RECOMMENDED) is None
    assert catalogue.start_refusal(DEPRECATED) is None
    refusal = catalogue.start_refusal(UNSUPPORTED)
    assert refusal is not None and "marked unsupported" in refusal and RECOMMENDED in refusal
    refusal = catalogue.start_refusal("localhost/studios/vscode:1.90-0.2")
    # No recommended vscode to migrate to: the reason alone.
    assert refusal is not None and "newer than the current one" in refusal
    assert "add this studio as new" not in refusal
    # Custom images are not the catalogue's business.
    assert catalogue.start_refusal("ghcr.io/acme/tool:1.0-0.0") is None
    assert catalogue.start_warning("ghcr.io/acme/tool:1.0-0.0") is None


def test_adding_a_newer_version_deprecates_the_older() -> None:
    one = parse_catalogue("templates:\n- {repository: 'x/r:4.2-0.1', tool: r}\n")
    assert one.templates[0].status == "recommended"
    two = parse_catalogue(
        "templates:\n- {repository: 'x/r:4.2-0.1', tool: r}\n"
        "- {repository: 'x/r:4.3-0.1', tool: r}\n"
    )
    assert [t.status for t in two.templates] == ["deprecated", "recommended"]
    # An update of the same tool version is newer; so is a newer connect version.
    three = parse_catalogue(
        "templates:\n- {repository: 'x/r:4.3-0.1', tool: r}\n"
        "- {repository: 'x/r:4.3-u1-0.0', tool: r}\n"
    )
    assert [t.status for t in three.templates] == ["deprecated", "recommended"]
    # An unsupported newest version leaves the older one recommended.
    four = parse_catalogue(
        "templates:\n- {repository: 'x/r:4.2-0.1', tool: r}\n"
        "- {repository: 'x/r:4.3-0.1', tool: r, status: unsupported}\n"
    )
    assert [t.status for t in four.templates] == ["recommended", "unsupported"]


@pytest.mark.parametrize(
    ("connect", "status"),
    [
        ("1.4", "recommended"),
        ("1.3", "recommended"),
        ("1.2", "recommended"),
        # Older than the two minor versions before the current one.
        ("1.1", "unsupported"),
        ("1.0", "unsupported"),
        # Newer than the controller speaks, or another major version.
        ("1.5", "unsupported"),
        ("0.4", "unsupported"),
        ("2.4", "unsupported"),
    ],
)
def test_connect_version_window(connect: str, status: str) -> None:
    text = f"templates:\n- {{repository: 'x/tool:1.0-{connect}', tool: tool}}\n"
    catalogue = parse_catalogue(text, connect_version=(1, 4))
    template = catalogue.templates[0]
    assert template.status == status, template
    if status == "unsupported":
        refusal = catalogue.start_refusal(template.repository)
        assert refusal is not None and f"connect version {connect}" in refusal
        assert "1.2 to 1.4 are supported" in refusal


def test_window_keeps_the_newest_supported_recommended() -> None:
    catalogue = parse_catalogue(
        "templates:\n- {repository: 'x/j:4.0-1.1', tool: j}\n"
        "- {repository: 'x/j:3.9-1.3', tool: j}\n"
        "- {repository: 'x/j:3.8-1.2', tool: j}\n",
        connect_version=(1, 4),
    )
    assert [t.status for t in catalogue.templates] == ["unsupported", "recommended", "deprecated"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("templates: [", "not YAML"),
        ("- repository: x/y:1-0.1\n", "expected a mapping with one key"),
        ("templates: {}\n", "templates: expected a list"),
        ("other: 1\ntemplates: []\n", "expected a mapping with one key"),
        ("templates:\n- just-a-string\n", "templates[0]: expected a mapping"),
        ("templates:\n- {tool: t}\n", "templates[0]: repository: required"),
        ("templates:\n- {repository: 'Not An Image', tool: t}\n", "not an image reference"),
        ("templates:\n- {repository: 'x/t:latest', tool: t}\n", "templates[0] (x/t:latest)"),
        ("templates:\n- {repository: 'x/t', tool: t}\n", "the tag must be"),
        ("templates:\n- {repository: 'x/t:1.0', tool: t}\n", "the tag must be"),
        ("templates:\n- {repository: 'x/t:1.0-0.1.2', tool: t}\n", "the tag must be"),
        ("templates:\n- {repository: 'x/t:1.0-v2-0.1', tool: t}\n", "the tag must be"),
        ("templates:\n- {repository: 'x/t:1.0-0.1'}\n", "(x/t:1.0-0.1): tool: required"),
        ("templates:\n- {repository: 'x/t:1.0-0.1', tool: 'Big Tool'}\n", "tool: required"),
        (
            "templates:\n- {repository: 'x/t:1.0-0.1', tool: t, status: recommended}\n",
            "status: expected experimental or unsupported",
        ),
        ("templates:\n- {repository: 'x/t:1.0-0.1', tool: t, icon: 3}\n", "icon: expected"),
        (
            "templates:\n- {repository: 'x/t:1.0-0.1', tool: t, version: 1}\n",
            "unknown field(s) version",
        ),
        (
            "templates:\n- {repository: 'x/t:1.0-0.1', tool: t}\n"
            "- {repository: 'x/t:1.0-0.1', tool: t}\n",
            "templates[1] (x/t:1.0-0.1): repository: listed twice",
        ),
    ],
)
def test_bad_files_name_the_entry(text: str, expected: str) -> None:
    with pytest.raises(CatalogueError) as caught:
        parse_catalogue(text, source="cat.yaml")
    message = str(caught.value)
    assert message.startswith("cat.yaml: ") and expected in message, message


def test_an_empty_catalogue_has_no_default() -> None:
    catalogue = parse_catalogue("templates: []\n")
    assert catalogue.templates == () and catalogue.default is None


async def test_a_broken_catalogue_stops_the_controller(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "templates.yaml"
    broken.write_text("templates:\n- {repository: 'x/t:1.0-0.1', tool: t, status: maybe}\n")
    harness = ControllerHarness(tmp_path / "data", templates_file=broken)
    with pytest.raises(CatalogueError, match=r"templates\[0\] \(x/t:1.0-0.1\): status"):
        await harness.start()
    await harness.close()
    # Nothing was written: the catalogue is read before the data directory.
    assert not (tmp_path / "data" / "admin-token").exists()
    # In a thread: `serve` runs an event loop of its own (its preflight checks, then the
    # controller), which cannot nest in this test's.
    code = await asyncio.to_thread(
        cli.main, ["serve", "--data-dir", str(tmp_path / "data2"), "--templates", str(broken)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "studio-controller: " in err and "templates[0] (x/t:1.0-0.1): status" in err
    missing = tmp_path / "missing.yaml"
    args = ["serve", "--data-dir", str(tmp_path / "d3"), "--templates", str(missing)]
    assert await asyncio.to_thread(cli.main, args) == 2
    assert "cannot read the template catalogue" in capsys.readouterr().err


# ------------------------------------------------------------ the API


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[ControllerHarness]:
    path = tmp_path / "templates.yaml"
    path.write_text(CATALOGUE)
    h = ControllerHarness(tmp_path / "data", templates_file=path)
    await h.start()
    try:
        yield h
    finally:
        await h.close()


async def _create(
    h: ControllerHarness, name: str, tool_url: str | None, *, auto_start: bool, **extra: Any
) -> tuple[int, Any]:
    body: dict[str, Any] = {"name": name, "computeEnvId": h.compute_env_id, **extra}
    if tool_url is not None:
        body["dataStudioToolUrl"] = tool_url
    return await h.request("POST", f"/studios?autoStart={str(auto_start).lower()}", body)


async def test_list_templates_in_the_reference_shape(harness: ControllerHarness) -> None:
    h = harness
    _, body = await h.request("GET", "/studios/templates?workspaceId=1", expect=200)
    assert body["totalSize"] == len(EXPECTED)
    assert {t["repository"]: t["status"] for t in body["templates"]} == EXPECTED
    for t in body["templates"]:
        # The reference's fields only, none null; icon only where the file has one.
        assert set(t) <= {"repository", "tool", "status", "icon"}, t
        assert None not in t.values()
        assert ("icon" in t) == (t["repository"] == RECOMMENDED)
    # In the file's order, paginated.
    _, page = await h.request("GET", "/studios/templates?max=2&offset=3", expect=200)
    assert [t["repository"] for t in page["templates"]] == list(EXPECTED)[3:5]
    assert page["totalSize"] == len(EXPECTED)


async def test_unsupported_template_is_refused_at_start(harness: ControllerHarness) -> None:
    h = harness
    status, body = await _create(h, "old", UNSUPPORTED, auto_start=True)
    assert status == 409, body
    assert f"template {UNSUPPORTED} is unsupported" in body["message"]
    assert RECOMMENDED in body["message"]
    # Nothing was created.
    _, listing = await h.request("GET", "/studios", expect=200)
    assert listing["totalSize"] == 0
    # Without a start it is created (a studio is kept to be added as new elsewhere), but
    # does not start.
    _, body = await _create(h, "old", UNSUPPORTED, auto_start=False)
    assert body["studio"]["template"]["status"] == "unsupported"
    sid = body["studio"]["sessionId"]
    status, refused = await h.request("PUT", f"/studios/{sid}/start")
    assert status == 409 and "is unsupported" in refused["message"], refused
    _, body = await h.request("GET", f"/studios/{sid}", expect=200)
    assert body["statusInfo"]["status"] == "stopped"
    # Connect too new for this controller: the reason says so.
    status, body = await _create(h, "code", "localhost/studios/vscode:1.90-0.2", auto_start=True)
    assert status == 409 and "connect version 0.2 is newer" in body["message"], body
    # A custom image (not in the catalogue) is not the catalogue's business, whatever its tag.
    status, body = await _create(h, "custom", "ghcr.io/acme/tool:1.0-0.0", auto_start=True)
    assert status == 200, body
    assert body["studio"]["customImage"] is True
    assert "status" not in body["studio"]["template"]


async def _running_message(h: ControllerHarness, agent: FakeAgent, sid: str) -> dict[str, Any]:
    """Let the agent run `sid` (reporting a message of its own); the studio once running."""
    desired = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    await agent.report(
        sid, desired.generation, pb.SESSION_STATUS_RUNNING, tool_port=1, message="jupyter is up"
    )
    body: dict[str, Any] = {}
    for _ in range(100):
        _, body = await h.request("GET", f"/studios/{sid}", expect=200)
        if body["statusInfo"]["status"] == "running":
            break
    assert body["statusInfo"]["status"] == "running", body
    return body


async def test_deprecated_template_starts_with_a_warning(harness: ControllerHarness) -> None:
    h = harness
    agent = FakeAgent(
        h.grpc_target, h.agent_token, agent_id="agent-1", compute_env_id=h.compute_env_id
    )
    await agent.connect()
    try:
        # At create with autoStart.
        status, body = await _create(h, "dep", DEPRECATED, auto_start=True)
        assert status == 200, body
        studio = body["studio"]
        assert studio["template"]["status"] == "deprecated"
        message = studio["statusInfo"]["message"]
        assert f"template {DEPRECATED} is deprecated" in message and RECOMMENDED in message
        # The agent's reports do not wipe it: it is shown with whatever the agent says.
        running = await _running_message(h, agent, studio["sessionId"])
        message = running["statusInfo"]["message"]
        assert message.startswith("jupyter is up; ") and "is deprecated" in message, message
        # At start: the start's own statusInfo says so.
        _, body = await _create(h, "exp", EXPERIMENTAL, auto_start=False)
        sid = body["studio"]["sessionId"]
        assert "message" not in body["studio"]["statusInfo"]
        _, start = await h.request("PUT", f"/studios/{sid}/start", expect=200)
        assert "is experimental" in start["statusInfo"]["message"], start
        running = await _running_message(h, agent, sid)
        assert "is experimental" in running["statusInfo"]["message"]
        assert running["template"]["status"] == "experimental"
        # A recommended template: no warning.
        _, body = await _create(h, "rec", RECOMMENDED, auto_start=True)
        running = await _running_message(h, agent, body["studio"]["sessionId"])
        assert running["statusInfo"]["message"] == "jupyter is up"
        assert running["template"] == {
            "repository": RECOMMENDED,
            "tool": "jupyter",
            "status": "recommended",
            "icon": "https://example.org/jupyter.svg",
        }
    finally:
        await agent.close()


async def test_clone_migrates_to_a_newer_version_of_the_same_tool(
    harness: ControllerHarness,
) -> None:
    h = harness
    _, body = await _create(h, "parent", DEPRECATED, auto_start=False)
    parent = body["studio"]["sessionId"]
    checkpoint = await add_checkpoint(h, parent, "parent_1")

    async def clone(name: str, tool_url: str | None, *, auto_start: bool = False) -> Any:
        return await _create(
            h, name, tool_url, auto_start=auto_start, initialCheckpointId=checkpoint
        )

    # Newer versions of the same tool: the same image, another repository of the tool, an
    # experimental one.
    for name, target in [
        ("m1", RECOMMENDED),
        ("m2", "studios/jupyterlab:4.6-0.1"),
        ("m3", EXPERIMENTAL),
    ]:
        status, body = await clone(name, target)
        assert status == 200, body
        assert body["studio"]["template"]["repository"] == target
        assert body["studio"]["parentCheckpoint"]["checkpointId"] == checkpoint
    # The parent's own template is kept when none is named.
    _, body = await clone("same", None)
    assert body["studio"]["template"]["repository"] == DEPRECATED
    # An older version, another tool: refused, naming both.
    for target in [
        "localhost/studios/jupyterlab:4.4-0.0",
        UNSUPPORTED,
        "studios/python-http:3.11-0.1",
        "localhost/studios/vscode:1.90-0.2",
    ]:
        status, body = await clone("bad", target)
        assert status == 400, (target, body)
        assert "newer version of the same tool" in body["message"]
        assert DEPRECATED in body["message"] and target in body["message"]
    # A migration is how a studio on an unsupported template is brought back: the clone
    # that keeps the template does not start, the one that moves does.
    _, body = await _create(h, "ancient", UNSUPPORTED, auto_start=False)
    old = body["studio"]["sessionId"]
    old_checkpoint = await add_checkpoint(h, old, "ancient_1")
    status, body = await _create(
        h, "keep", None, auto_start=True, initialCheckpointId=old_checkpoint
    )
    assert status == 409 and "is unsupported" in body["message"], body
    status, body = await _create(
        h, "moved", RECOMMENDED, auto_start=True, initialCheckpointId=old_checkpoint
    )
    assert status == 200, body
    assert body["studio"]["template"]["status"] == "recommended"
