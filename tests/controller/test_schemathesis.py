"""Schemathesis over controller/openapi.yaml against the in-process controller (issue 13).

Valid and invalid data (``--mode all``) for every documented operation, in every phase
(examples, coverage, fuzzing, stateful: links inferred from the spec), at most
`MAX_EXAMPLES` generated cases per operation so that the run stays within a few minutes on
two cores. The checks: `not_a_server_error` (no answer is a 5xx, and no handler logged an
unexpected error), and the answers' status codes, content types and bodies are the ones
openapi.yaml documents. Authenticated as the bootstrap admin (owner of the default workspace);
path parameters draw, half of the time, the ids of a seeded studio, checkpoint, data-link,
credentials, team, user and token, so that operations on one thing reach their logic
instead of a 404. `tests/controller/schemathesis_hooks.py` keeps the run from deleting
its own token or leaving its workspace.

STUDIOS_FUZZ_SEED picks another seed (the default is fixed, so CI is repeatable);
STUDIOS_FUZZ_EXAMPLES another bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import SPEC_PATH, ControllerHarness
from tests.controller.test_datalinks import add_credentials, add_link
from tests.controller.test_roles import add_checkpoint, add_user, create

MAX_EXAMPLES = int(os.environ.get("STUDIOS_FUZZ_EXAMPLES", "12"))
SEED = int(os.environ.get("STUDIOS_FUZZ_SEED", "13"))
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
ST = Path(sys.executable).with_name("st")

pytestmark = pytest.mark.timeout(420)


def _config(ids: dict[str, list[str | int]]) -> str:
    lines = ["[generation]", 'database = "none"', ""]
    for name, values in ids.items():
        lines += [f"[dictionaries.{name}]", f"values = {json.dumps(values)}", ""]
    lines.append("[parameters]")
    for name in ids:
        lines.append(f'"path.{name}" = {{ dictionary = "{name}", probability = 0.5 }}')
    return "\n".join(lines) + "\n"


async def test_schemathesis_finds_no_server_error(
    controller_harness: ControllerHarness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if not ST.exists():
        pytest.fail(f"schemathesis is not installed ({ST}): scripts/install installs it")
    h = controller_harness
    # Things for the operations on one thing to find.
    sid = await create(h, "seeded", description="a studio to fuzz")
    checkpoint = await add_checkpoint(h, sid, "seeded-checkpoint")
    credentials = await add_credentials(h)
    link = (await add_link(h, "seeded-link", "s3://seeded-bucket", credentials))["id"]
    _, team = await h.request("POST", "/orgs/1/teams", {"team": {"name": "seeded"}}, expect=200)
    member, _ = await add_user(h, "member", "launch")
    _, participants = await h.request(
        "GET", "/orgs/1/workspaces/1/participants?max=100", expect=200
    )
    by_user = {p["memberId"]: p["participantId"] for p in participants["participants"]}
    _, tokens = await h.request("GET", "/tokens", expect=200)
    (own_token,) = [t["id"] for t in tokens["tokens"]]
    _, spare = await h.request("POST", "/tokens", {"name": "spare"}, expect=200)
    _, me = await h.request("GET", "/user-info", expect=200)
    admin_id = me["user"]["id"]

    config = tmp_path / "schemathesis.toml"
    config.write_text(
        _config(
            {
                "orgId": [1],
                "workspaceId": [1],
                "sessionId": [sid],
                "checkpointId": [checkpoint],
                "credentialsId": [credentials],
                "dataLinkId": [link],
                "teamId": [team["team"]["teamId"]],
                "memberId": [member],
                "participantId": [by_user[member]],
                "tokenId": [spare["token"]["id"]],
            }
        )
    )
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": str(HOOKS),
        "STUDIOS_FUZZ_PROTECTED": json.dumps(
            {"tokenId": own_token, "participantId": by_user[admin_id]}
        ),
        "NO_COLOR": "1",
    }
    report = tmp_path / "report.json"
    command = [
        str(ST),
        "--config-file",
        str(config),
        "run",
        str(SPEC_PATH),
        "--url",
        h.url,
        "--header",
        f"Authorization: Bearer {h.admin_token}",
        "--mode",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        # No 5xx; and every answer is one openapi.yaml documents (status, type, schema).
        "--checks",
        ",".join(CHECKS),
        # One worker: the controller shares this test's event loop and its two cores.
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--no-shrink",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    caplog.set_level(logging.ERROR)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    output, _ = await process.communicate()
    elapsed = time.monotonic() - started
    text = output.decode(errors="replace")
    print(text[-6000:])
    print(f"schemathesis: {elapsed:.0f} s, seed {SEED}, at most {MAX_EXAMPLES} examples")
    crashes = [
        r for r in caplog.records if r.name.startswith("controller") and r.levelno >= logging.ERROR
    ]
    assert not crashes, "unexpected errors in the controller:\n" + "\n".join(
        f"{r.getMessage()}\n{r.exc_text or ''}" for r in crashes[:5]
    )
    assert process.returncode == 0, (
        f"schemathesis failed (exit {process.returncode}):\n{text[-6000:]}"
    )
    assert "Server error" not in text
    # Every documented operation was tested.
    spec = yaml.safe_load(SPEC_PATH.read_text())
    operations = sum(
        method in ("get", "put", "post", "delete", "patch")
        for item in spec["paths"].values()
        for method in item
    )
    assert f"Tested: {operations}" in text, text[-3000:]
