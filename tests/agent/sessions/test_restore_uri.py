"""The agent restores only checkpoints of the session's own store (issue 12).

A restore URI the controller sends must lie in the session's `checkpoint_base_uri`
(`agent.checkpoints.content_store.store_refusal`, the check the controller makes too):
anything else errors the start, "restore URI ... is outside the session's checkpoint
store ...", and nothing of it lands in the session. The real agent (in process), driven
by the fake controller.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from studios.agent.v1 import agent_pb2 as pb

from agent.checkpoints import engine as E
from agent.checkpoints.content_store import store_refusal, within_store
from agent.cli import quiet_client_loggers
from agent.daemon import Agent
from tests.agent_fixtures import (  # noqa: F401  (fixtures by name)
    agent_config_fixture,
    agent_fixture,
    controller_fixture,
)
from tests.fake_controller import FakeController, desired

RUNNING = pb.SESSION_STATUS_RUNNING
ERRORED = pb.SESSION_STATUS_ERRORED

BASE = "s3://bucket/work/.studios/checkpoints"


@pytest.mark.parametrize(
    ("uri", "session_id", "why"),
    [
        (f"{BASE}/manifests/aaaa0001/k1", "", ""),
        (f"{BASE}/manifests/aaaa0001/k1", "aaaa0001", ""),
        (f"{BASE}/aaaa0001/20240101T000000-ab.tar.gz", "aaaa0001", ""),
        ("S3://bucket/work/.studios/checkpoints/manifests/aaaa0001/k1", "", ""),
        # another session's manifest, when one session's is asked for
        (f"{BASE}/manifests/bbbb0002/k1", "aaaa0001", "of session bbbb0002"),
        # another bucket, another scheme, a sibling directory sharing the prefix
        ("s3://other/work/.studios/checkpoints/manifests/aaaa0001/k1", "", "not below"),
        ("file:///work/.studios/checkpoints/manifests/aaaa0001/k1", "", "not below"),
        ("s3://bucket/work/.studios/checkpointsx/manifests/aaaa0001/k1", "", "not below"),
        ("s3://bucket/work/.studios/manifests/aaaa0001/k1", "", "not below"),
        # detours that name the store and leave it
        (f"{BASE}/../../evil/manifests/aaaa0001/k1", "", "'..'"),
        (f"{BASE}/manifests/aaaa0001/../bbbb0002/k1", "", "'..'"),
        (f"{BASE}/./manifests/aaaa0001/k1", "", "'..'"),
        (f"{BASE}//manifests/aaaa0001/k1", "", "'..'"),
        (f"{BASE}/manifests/aaaa0001/k1?versionId=1", "", "query"),
        (f"{BASE}/manifests/aaaa0001\\k1", "", "backslash"),
        (f"{BASE}/manifests/aaaa0001/k1\n", "", "control"),
        # not a checkpoint of the store: packs, indexes, config, deeper names
        (f"{BASE}/data/ab/abcdef", "", "not a checkpoint"),
        (f"{BASE}/config", "", "not a checkpoint"),
        (f"{BASE}/manifests/aaaa0001/k1/more", "", "not a checkpoint"),
        (f"{BASE}/aaaa0001/x.tar", "", "not a checkpoint"),
        ("", "", "no checkpoint URI"),
        ("manifests/aaaa0001/k1", "", "neither absolute"),
    ],
)
def test_store_refusal(uri: str, session_id: str, why: str) -> None:
    got = store_refusal(uri, BASE + "/", session_id=session_id)
    if why:
        assert why in got
    else:
        assert got == ""
    assert within_store(uri, BASE, session_id=session_id) == (not why)


def test_archives_only_when_asked_and_plain_paths_are_file_uris(tmp_path: Path) -> None:
    base = str(tmp_path / "ck")
    archive = f"file://{base}/aaaa0001/x.tar.gz"
    assert within_store(archive, base)
    assert "not a checkpoint" in store_refusal(archive, base, archives=False)
    assert within_store(f"file://{base}/manifests/aaaa0001/k", base + "/")
    assert within_store(f"{base}/manifests/aaaa0001/k", f"file://{base}")
    assert not within_store(f"file://{base}/../ck/manifests/aaaa0001/k", base)


async def test_a_restore_uri_outside_the_store_errors_the_start(
    controller: FakeController, agent: Agent, tmp_path: Path
) -> None:
    store = f"file://{tmp_path}/work/.studios/checkpoints"
    elsewhere = f"file://{tmp_path}/attacker/.studios/checkpoints"
    src = tmp_path / "planted"
    src.mkdir()
    (src / "planted.txt").write_bytes(b"the attacker's file")
    # A complete, valid checkpoint of this very session id, in another store.
    planted = await E.backup(elsewhere, "abcd0001", src)
    assert planted.uri.startswith(elsewhere)

    controller.push(desired("abcd0001", restore_uri=planted.uri, checkpoint_base_uri=store))
    obs = await controller.wait_status("abcd0001", ERRORED)
    assert f"restore URI {planted.uri} is outside the session's checkpoint store" in obs.message
    step = next(s for s in obs.progress if s.name == "restoring the checkpoint")
    assert step.status == pb.STEP_STATUS_ERRORED
    assert not any(o.status == RUNNING for o in controller.observed("abcd0001"))
    assert not [p for p in (tmp_path / "state").rglob("planted.txt")]

    # Another session's manifest reached by '..' from this store: refused the same way.
    sneaky = f"{store}/../../attacker/.studios/checkpoints/manifests/abcd0001/{planted.key}"
    controller.push(
        desired("abcd0001", generation=2, restore_uri=sneaky, checkpoint_base_uri=store)
    )
    obs = await controller.wait_status("abcd0001", ERRORED, generation=2)
    assert "outside the session's checkpoint store" in obs.message and "'..'" in obs.message
    assert not [p for p in tmp_path.rglob("planted.txt") if src not in p.parents]

    # The same checkpoint inside the store (another session's: a clone's parent) restores.
    inside = await E.backup(store, "abcd0002", src)
    controller.push(
        desired("abcd0001", generation=3, restore_uri=inside.uri, checkpoint_base_uri=store)
    )
    obs = await controller.wait_status("abcd0001", RUNNING, generation=3)
    assert (Path(obs.root_dir) / "planted.txt").read_bytes() == b"the attacker's file"


async def test_without_a_store_in_the_spec_the_agents_default_store_is_the_one(
    controller: FakeController, agent: Agent, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("x")
    elsewhere = await E.backup(f"file://{tmp_path}/other", "abcd0003", src)
    controller.push(desired("abcd0003", restore_uri=elsewhere.uri))
    obs = await controller.wait_status("abcd0003", ERRORED)
    assert "outside the session's checkpoint store" in obs.message
    default = str(agent.config.state_dir)
    assert default in obs.message


async def test_data_link_keys_reach_no_log_and_no_report(
    controller: FakeController, agent: Agent, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The one place the keys are on the agent is the desired message in memory: a start
    whose data-link cannot be mounted says why without them, in its logs and reports."""
    caplog.set_level(logging.DEBUG)
    quiet_client_loggers()  # as `studio-agent serve` does, even with --log-level debug
    access, secret = "AKIAAGENTSIDEKEY42", "agent/side+SECRET/never-logged-42"
    d = desired("abcd0004", checkpoint_base_uri=str(tmp_path / "ck"))
    d.spec.data_links.append(
        pb.DataLinkMount(
            data_link_id="v1-user-keys",
            mount_name="keys",
            resource_ref="s3://keys-bucket",
            read_only=True,
            endpoint="http://127.0.0.1:9",
            access_key_id=access,
            secret_access_key=secret,
            required=False,
        )
    )
    controller.push(d)
    obs = await controller.wait_status("abcd0004", RUNNING)
    [mount] = obs.data_links
    assert mount.mount_state == pb.DATA_LINK_MOUNT_STATE_FAILED and "v1-user-keys" in mount.message
    handle = (agent.config.state_dir / "sessions" / "abcd0004" / "handle.json").read_text()
    for text in (
        [r.getMessage() + (r.exc_text or "") for r in caplog.records]
        + [str(m) for _, m in controller.received]
        + [handle]
    ):
        assert access not in text and secret not in text
