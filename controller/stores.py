"""Where a compute environment keeps what outlives a session.

Checkpoints: ``<workDir>/.studios/checkpoints`` (workDir may be a path or a URI),
one store shared by the environments with the same work directory. Agents are
told it in each session's spec (`controller.desired`); garbage collection reads
the same store (`controller.checkpoint_gc`).
"""

from __future__ import annotations

__all__ = ["checkpoint_base_uri"]


def checkpoint_base_uri(work_dir: str) -> str:
    """``<workDir>/.studios/checkpoints``; workDir may be a path or a URI."""
    return work_dir.rstrip("/") + "/.studios/checkpoints"
