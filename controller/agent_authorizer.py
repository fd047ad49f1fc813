"""Which agent may say what (the Kubernetes node-authorizer idea).

An agent's stream is authenticated as one agent id (its certificate's); every message
it sends about a session is decided here before anything of it is applied:

- observed state (`SessionObserved`, alone or in an `Inventory`): only for a studio
  placed on this agent, of its current generation. An older generation is `STALE`
  (ignored quietly, as always: a late report of an ended run); a session unknown to the
  controller, deleted, placed on another agent (or on none), or a generation the
  controller has not started yet is `REFUSE`d (ignored and logged; the agent is told to
  forget a session that is not its own, which is also how a moved or deleted session
  leaves a host);
- connections (`SessionConnections`): only for a live studio placed on this agent;
- connection visits (`ConnectionVisit`, the audit): a new visit only for a studio placed
  on this agent (a deleted one too while it is still placed there: a visit the stop
  ended, reported after the delete); a visit already recorded is looked up by this
  agent's id and the visit id only, so an agent can close its own records and never
  touch another agent's;
- checkpoint events: only for a studio placed on this agent (its current generation or
  an earlier one: a late event of an ended run from the agent the studio is still
  placed on), never a generation not started yet, and only a URI inside the studio's
  compute-environment store, of exactly that session: ``<store>/manifests/<session>/<key>``
  (`controller.stores.checkpoint_refusal`; no other scheme, bucket or directory, no
  ``.``/``..`` detour, no other session's manifests; the first format's ``.tar.gz``
  archives are only read any more, so no event may name one). One more: the final
  checkpoint of a run the controller left behind on this agent (`StudioRun`: the
  studio was started elsewhere after the agent was lost) is accepted from that agent,
  of that generation only, as a *recovered* checkpoint (kept by name, never the default
  restore point). An agent that never ran the studio, or ran another generation of it,
  has no such row: it cannot add a checkpoint to a studio it does not hold; and the agent
  a studio is placed on now cannot add one to a run that row gives to another agent.

Decisions only: no database access, no logging (the callers log, with the agent id,
the session id and the reason). docs/contract-notes.md "Which agent may say what".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from controller.models import ComputeEnv, Studio, StudioRun
from controller.stores import checkpoint_refusal

__all__ = [
    "Decision",
    "Verdict",
    "checkpoint_event",
    "connection_visit",
    "connections",
    "session_observed",
]


class Verdict(enum.Enum):
    ACCEPT = "accept"
    # A report of an earlier generation of a studio placed on this agent: ignored quietly.
    STALE = "stale"
    # Not this agent's to say: ignored and logged.
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str = ""
    # REFUSE only: the session is not this agent's (unknown, deleted, placed elsewhere),
    # so the agent is to be told to forget it.
    foreign: bool = False
    # REFUSE only: the normal course of things (a deleted studio the agent has not
    # forgotten yet), not worth a warning.
    quiet: bool = False
    # ACCEPT of a checkpoint only: the final checkpoint of a run the studio has left
    # behind on this agent (`StudioRun`), to be kept by name.
    recovered: bool = False

    @property
    def accepted(self) -> bool:
        return self.verdict is Verdict.ACCEPT


ACCEPT = Decision(Verdict.ACCEPT)


def _placement(agent_id: str, session_id: str, studio: Studio | None) -> Decision | None:
    """A refusal when the studio is not (live and) placed on `agent_id`, else None."""
    if studio is None:
        return Decision(
            Verdict.REFUSE, f"session {session_id} is unknown to the controller", foreign=True
        )
    if studio.deleted:
        return Decision(
            Verdict.REFUSE,
            f"studio {session_id} is deleted",
            foreign=True,
            quiet=studio.agent_id == agent_id,
        )
    if studio.agent_id != agent_id:
        where = f"agent {studio.agent_id}" if studio.agent_id else "no agent"
        return Decision(
            Verdict.REFUSE,
            f"studio {session_id} is placed on {where}, not on agent {agent_id}",
            foreign=True,
        )
    return None


def session_observed(
    agent_id: str, session_id: str, generation: int, studio: Studio | None
) -> Decision:
    """May `agent_id` report the state of `session_id` at `generation`?"""
    refused = _placement(agent_id, session_id, studio)
    if refused is not None:
        return refused
    assert studio is not None
    if generation < studio.generation:
        return Decision(Verdict.STALE, f"generation {generation} has ended")
    if generation > studio.generation:
        return Decision(
            Verdict.REFUSE,
            f"generation {generation} is newer than the studio's {studio.generation}",
        )
    return ACCEPT


def connections(agent_id: str, session_id: str, studio: Studio | None) -> Decision:
    """May `agent_id` say who is connected to `session_id` through its proxy?"""
    return _placement(agent_id, session_id, studio) or ACCEPT


def connection_visit(agent_id: str, session_id: str, studio: Studio | None) -> Decision:
    """May `agent_id` record a new visit to `session_id` through its proxy?

    The rule of `connections`, plus a deleted studio still placed on this agent: the
    visit happened while it was live, and its report may come late (the stop that ended
    it, then the delete, while the agent was away). Not tied to a generation or a
    status: the report of a visit that ended with a stop arrives after it.
    """
    if studio is not None and studio.deleted and studio.agent_id == agent_id:
        return ACCEPT
    return _placement(agent_id, session_id, studio) or ACCEPT


def checkpoint_event(
    agent_id: str,
    session_id: str,
    generation: int,
    uri: str,
    studio: Studio | None,
    compute_env: ComputeEnv | None,
    left_behind: StudioRun | None = None,
) -> Decision:
    """May `agent_id` record checkpoint `uri` of `session_id`'s run `generation`?

    A deleted studio's event is still accepted from the agent it is placed on (the
    catalogue row lets the GC find the manifest); once that agent has forgotten the
    studio (no placement left) nothing is recorded for it any more. `left_behind`: the
    run `generation` of the studio as the controller left it behind, if it did; from
    the agent it names, its checkpoint is accepted as recovered.
    """
    recovered = False
    if studio is not None and studio.deleted and studio.agent_id == agent_id:
        refused = None
    else:
        refused = _placement(agent_id, session_id, studio)
    if (
        refused is not None
        and studio is not None
        and left_behind is not None
        and left_behind.session_id == session_id
        and left_behind.generation == generation
        and left_behind.agent_id == agent_id
    ):
        refused, recovered = None, True
    if refused is not None:
        return refused
    assert studio is not None
    if (
        not recovered
        and left_behind is not None
        and left_behind.generation == generation
        and left_behind.agent_id != agent_id
    ):
        # The studio is placed here now, but that run was another agent's.
        return Decision(
            Verdict.REFUSE,
            f"run {generation} of studio {session_id} ran on agent {left_behind.agent_id}, "
            f"not on agent {agent_id}",
        )
    if generation > studio.generation:
        return Decision(
            Verdict.REFUSE,
            f"generation {generation} is newer than the studio's {studio.generation}",
        )
    if compute_env is None:
        return Decision(
            Verdict.REFUSE, f"studio {session_id} has no compute environment to hold checkpoints"
        )
    why = checkpoint_refusal(uri, compute_env.work_dir, session_id=session_id, archives=False)
    if why:
        return Decision(
            Verdict.REFUSE,
            f"checkpoint URI {uri!r} is outside the compute environment's store: {why}",
        )
    return Decision(Verdict.ACCEPT, recovered=True) if recovered else ACCEPT
