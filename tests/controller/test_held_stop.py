"""A `stopped` report that names its run's final checkpoint waits for that checkpoint.

The agent sends a run's FINALIZED event before it reports `stopped` (and re-sends pending
events before its Inventory), but the controller does not rely on that order: a `stopped`
whose final checkpoint is not recorded keeps the studio `stopping` (a start is refused
rather than restoring the checkpoint before the final one) until the event is recorded.
A report naming no checkpoint (none written, a failed one, an older agent) is applied at
once as before; a stop deadline reached while waiting names the missing checkpoint.
Fake agents on the real gRPC stream against the in-process controller.
"""

from __future__ import annotations

import time

from studios.agent.v1 import agent_pb2 as pb

from tests.conftest import ControllerHarness
from tests.controller.conftest import AgentFactory
from tests.controller.studio_reads import deadline_settings, studio, until_status
from tests.fake_agent import FakeAgent, checkpoint_uri, observed

RECORDED = pb.CHECKPOINT_ACK_RESULT_RECORDED
INTERIM = pb.CHECKPOINT_STATUS_INTERIM
STOPPED = pb.SESSION_STATUS_STOPPED


async def _stopping_with_interim(
    h: ControllerHarness, agent: FakeAgent, name: str
) -> tuple[str, int]:
    """A studio run by `agent` with an interim checkpoint recorded, then asked to stop."""
    _, body = await h.request(
        "POST", "/studios", {"name": name, "computeEnvId": h.compute_env_id}, expect=200
    )
    sid = str(body["studio"]["sessionId"])
    wanted = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING)
    g = wanted.generation
    await agent.report(sid, g, pb.SESSION_STATUS_RUNNING, tool_port=41000)
    await until_status(h, sid, "running")
    # A minute old: the final checkpoint (saved now) is the newer one.
    await agent.checkpoint(
        sid, g, f"manifests/{sid}/interim", INTERIM, saved_at=int(time.time()) - 60
    )
    assert (await agent.wait_ack(sid, f"manifests/{sid}/interim")).result == RECORDED
    mark = len(agent.responses)
    await h.request("PUT", f"/studios/{sid}/stop", expect=200)
    await agent.wait_desired(sid, pb.DESIRED_STATUS_STOPPED, start=mark)
    await agent.report(sid, g, pb.SESSION_STATUS_STOPPING)
    await until_status(h, sid, "stopping")
    return sid, g


async def _report_stopped(agent: FakeAgent, sid: str, g: int, final_key: str) -> None:
    """Report `stopped` (naming `final_key`) and return once the controller has applied it.

    The controller handles one stream's messages in order: the ack of an event sent
    after the report (refused: an unknown session) says the report was handled."""
    report = observed(sid, g, STOPPED, message="stopped")
    report.final_checkpoint_key = final_key
    await agent.send(pb.ConnectRequest(session=report))
    mark = len(agent.responses)
    await agent.checkpoint("0bad0bad", 1, "manifests/0bad0bad/barrier", INTERIM)
    await agent.wait_ack("0bad0bad", "manifests/0bad0bad/barrier", start=mark)


async def _start_restores(h: ControllerHarness, agent: FakeAgent, sid: str) -> str:
    mark = len(agent.responses)
    await h.request("PUT", f"/studios/{sid}/start", expect=200)
    wanted = await agent.wait_desired(sid, pb.DESIRED_STATUS_RUNNING, start=mark)
    return wanted.restore.uri


async def test_stopped_before_its_final_checkpoint_waits_for_it(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = make_agent("agent-1")
    await agent.connect()
    sid, g = await _stopping_with_interim(h, agent, "held")
    final = f"manifests/{sid}/final"

    # `stopped` arrives before the FINALIZED event: the studio stays stopping, its
    # progress naming the checkpoint awaited, and a start is refused (it would restore
    # the interim checkpoint, losing what the run wrote after it).
    await _report_stopped(agent, sid, g, final)
    body = await studio(h, sid)
    assert body["statusInfo"]["status"] == "stopping", body["statusInfo"]
    assert body["progress"][-1] == {
        "message": (
            f"waiting for the final checkpoint {final} of run {g}: the agent reported the "
            "session stopped before its checkpoint event was recorded"
        ),
        "status": "in-progress",
        "warnings": [],
    }
    status, refused = await h.request("PUT", f"/studios/{sid}/start")
    assert status == 409 and "is stopping" in refused["message"], refused
    # The same report again (the agent's next Inventory) changes nothing.
    await _report_stopped(agent, sid, g, final)
    assert (await studio(h, sid))["statusInfo"]["status"] == "stopping"

    # The event: recorded, and the held `stopped` is applied with it, before its ack.
    await agent.checkpoint(sid, g, final)
    assert (await agent.wait_ack(sid, final)).result == RECORDED
    body = await studio(h, sid)
    assert body["statusInfo"]["status"] == "stopped", body["statusInfo"]
    assert all(step["message"].find(final) < 0 for step in body["progress"])
    # The start restores the run's final checkpoint.
    assert await _start_restores(h, agent, sid) == checkpoint_uri(sid, final)


async def test_stopped_is_applied_at_once_when_nothing_is_awaited(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = make_agent("agent-1")
    await agent.connect()

    # No key (the final checkpoint failed and was retried later, nothing to save, or an
    # agent older than the field): stopped at once, as before; the restore point is the
    # newest checkpoint recorded.
    sid, g = await _stopping_with_interim(h, agent, "no key")
    await _report_stopped(agent, sid, g, "")
    assert (await studio(h, sid))["statusInfo"]["status"] == "stopped"
    assert await _start_restores(h, agent, sid) == checkpoint_uri(sid, f"manifests/{sid}/interim")

    # The usual order (the event first): stopped at once too.
    sid, g = await _stopping_with_interim(h, agent, "in order")
    final = f"manifests/{sid}/final"
    await agent.checkpoint(sid, g, final)
    assert (await agent.wait_ack(sid, final)).result == RECORDED
    await _report_stopped(agent, sid, g, final)
    assert (await studio(h, sid))["statusInfo"]["status"] == "stopped"
    assert await _start_restores(h, agent, sid) == checkpoint_uri(sid, final)


async def test_a_stopped_report_held_on_one_stream_is_applied_after_a_reconnect(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    """The agent's stream breaks between the two (or it reconnects to another controller):
    it sends its unacknowledged event, then the Inventory that reports `stopped` again."""
    h = controller_harness
    agent = make_agent("agent-1")
    await agent.connect()
    sid, g = await _stopping_with_interim(h, agent, "reconnected")
    final = f"manifests/{sid}/final"
    await _report_stopped(agent, sid, g, final)
    await agent.close()

    again = make_agent("agent-1")
    await again.connect()
    await again.checkpoint(sid, g, final)
    assert (await again.wait_ack(sid, final)).result == RECORDED
    report = observed(sid, g, STOPPED, message="stopped")
    report.final_checkpoint_key = final
    await again.inventory([report])
    await until_status(h, sid, "stopped")
    assert await _start_restores(h, again, sid) == checkpoint_uri(sid, final)


async def test_the_stop_deadline_names_the_missing_final_checkpoint(
    controller_harness: ControllerHarness, make_agent: AgentFactory
) -> None:
    h = controller_harness
    agent = make_agent("agent-1")
    await agent.connect()
    sid, g = await _stopping_with_interim(h, agent, "never")
    final = f"manifests/{sid}/final"
    await _report_stopped(agent, sid, g, final)
    deadline_settings(h).stopping_deadline_seconds = 0.5
    body = await until_status(h, sid, "errored")
    assert body["statusInfo"]["message"] == (
        f"stop did not finish within 0.5 s: stuck in waiting for the final checkpoint {final} "
        f"of run {g}: the agent reported the session stopped before its checkpoint event "
        "was recorded"
    )
    deadline_settings(h).stopping_deadline_seconds = 1800
    # The event coming after all: the stop is taken, and its checkpoint is the restore point.
    await agent.checkpoint(sid, g, final)
    assert (await agent.wait_ack(sid, final)).result == RECORDED
    assert (await studio(h, sid))["statusInfo"]["status"] == "stopped"
    assert await _start_restores(h, agent, sid) == checkpoint_uri(sid, final)
