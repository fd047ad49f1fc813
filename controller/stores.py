"""Where a compute environment keeps what outlives a session.

Checkpoints: ``<workDir>/.studios/checkpoints`` (workDir may be a path or a URI),
one store shared by the environments with the same work directory. Agents are
told it in each session's spec (`controller.desired`); garbage collection reads
the same store (`controller.checkpoint_gc`).

Only checkpoints inside that store count: `checkpoint_refusal` says why a URI is
not one, with the agent's own check (`agent.checkpoints.content_store.store_refusal`,
the one the agent applies to the restores it is told to do), so both sides agree.
"""

from __future__ import annotations

from agent.checkpoints.content_store import store_refusal

__all__ = ["checkpoint_base_uri", "checkpoint_refusal"]


def checkpoint_base_uri(work_dir: str) -> str:
    """``<workDir>/.studios/checkpoints``; workDir may be a path or a URI."""
    return work_dir.rstrip("/") + "/.studios/checkpoints"


def checkpoint_refusal(
    uri: str, work_dir: str, *, session_id: str = "", archives: bool = True
) -> str:
    """Why `uri` is not a checkpoint in the store of the compute environment with
    `work_dir` ("" when it is one): ``<store>/manifests/<session>/<key>``, or with
    `archives` the first format's ``<store>/<session>/<name>.tar.gz``; with
    `session_id` a checkpoint of that session only."""
    return store_refusal(
        uri, checkpoint_base_uri(work_dir), session_id=session_id, archives=archives
    )
