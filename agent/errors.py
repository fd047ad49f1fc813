"""One root for the agent's exceptions; callers map them to gRPC/HTTP only at the boundary."""

from __future__ import annotations

__all__ = [
    "AgentError",
    "CheckpointError",
    "RuntimeStartError",
    "RuntimeUnavailable",
    "StartRefused",
    "StartTimeout",
    "UnsafeArchive",
    "VolumeError",
    "VolumeGone",
]


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class RuntimeUnavailable(AgentError):
    """The named runtime backend cannot be used on this host or in this build."""


class RuntimeStartError(AgentError):
    """The tool could not be started (bad template, exec failure, early exit)."""


class StartTimeout(RuntimeStartError, TimeoutError):
    """The tool did not answer on its port in time."""


class StartRefused(AgentError):
    """A start the agent will not carry out (e.g. an image of an unsupported connect
    version): nothing of the session is made."""


class VolumeError(AgentError):
    """A session volume could not be prepared, grown or released."""


class VolumeGone(VolumeError):
    """A volume that should exist (a running or stopping session's) is not there any more:
    recovery never re-creates it, since an empty volume checkpointed would replace data."""


class CheckpointError(AgentError):
    """A checkpoint could not be written or restored."""


class UnsafeArchive(CheckpointError):
    """A checkpoint archive holds a member that would write outside the target."""
