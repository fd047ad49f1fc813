"""A session handle as the controller sees it (`SessionObserved`), and the step names.

The only module of `agent.sessions` that spells the wire format of observed state.
"""

from __future__ import annotations

from studios.agent.v1 import agent_pb2 as pb

from agent.datalinks import STATE_FAILED
from agent.sessions.handle import SessionHandle
from agent.volumes import VolumeInfo

__all__ = [
    "STEP_ANSWER",
    "STEP_BUILD",
    "STEP_CHECKPOINT",
    "STEP_MOUNT",
    "STEP_RELEASE",
    "STEP_RESTORE",
    "STEP_START",
    "STEP_STOP",
    "STEP_VOLUME",
    "observed",
    "running_message",
    "volume_pb",
]

STEP_BUILD = "building the environment"
STEP_VOLUME = "preparing the volume"
STEP_RESTORE = "restoring the checkpoint"
STEP_MOUNT = "mounting data"
STEP_START = "starting the tool"
STEP_ANSWER = "waiting for the tool to answer"
STEP_STOP = "stopping the tool"
STEP_CHECKPOINT = "writing the final checkpoint"
STEP_RELEASE = "releasing the volume"

_STATUS_TO_PB = {
    "starting": pb.SESSION_STATUS_STARTING,
    "running": pb.SESSION_STATUS_RUNNING,
    "stopping": pb.SESSION_STATUS_STOPPING,
    "stopped": pb.SESSION_STATUS_STOPPED,
    "errored": pb.SESSION_STATUS_ERRORED,
    "building": pb.SESSION_STATUS_BUILDING,
    "buildFailed": pb.SESSION_STATUS_BUILD_FAILED,
}
_STEP_TO_PB = {
    "pending": pb.STEP_STATUS_PENDING,
    "in_progress": pb.STEP_STATUS_IN_PROGRESS,
    "succeeded": pb.STEP_STATUS_SUCCEEDED,
    "errored": pb.STEP_STATUS_ERRORED,
}


def volume_pb(v: VolumeInfo) -> pb.Volume:
    # The volume kinds (agent/volumes) as the wire's enum; UNSPECIFIED for one it lacks.
    kind = {
        "directory": pb.VOLUME_KIND_DIRECTORY,
        "xfs-loop": pb.VOLUME_KIND_XFS_LOOP,
    }.get(v.kind, pb.VOLUME_KIND_UNSPECIFIED)
    return pb.Volume(
        volume_kind=kind, path=v.path, size_bytes=v.size_bytes, used_bytes=v.used_bytes
    )


def observed(h: SessionHandle) -> pb.SessionObserved:
    obs = pb.SessionObserved(
        session_id=h.session_id,
        generation=h.generation,
        status=_STATUS_TO_PB[h.status],
        message=h.message,
        runtime=h.runtime,
        tool_port=h.port,
        root_dir=h.visible_root,
        started_at=h.started_at,
        exited=h.exited,
        exit_code=h.exit_code,
        # Only with `stopped`: the controller waits for this checkpoint before it applies
        # that status (a start then restores it, never the one before).
        final_checkpoint_key=h.final_key if h.status == "stopped" else "",
    )
    obs.data_links.extend(s.to_pb() for s in h.data_links)
    if h.build:
        b = h.build
        obs.build.CopyFrom(
            pb.EnvironmentBuild(
                env_hash=str(b.get("env_hash", "")),
                image=str(b.get("image", "")),
                cached=bool(b.get("cached")),
                seconds=float(b.get("seconds") or 0.0),
                failed=bool(b.get("failed")),
                log=str(b.get("log", "")),
                log_truncated=bool(b.get("log_truncated")),
            )
        )
    if h.volume:
        obs.volume.CopyFrom(volume_pb(h.volume))
    obs.progress.extend(
        pb.ProgressStep(
            name=s.name,
            status=_STEP_TO_PB[s.status],
            message=s.message,
            warnings=s.warnings,
            percent=s.percent,
        )
        for s in h.progress
    )
    return obs


def running_message(h: SessionHandle) -> str:
    # Every viewer of the studio reads it: no port (the tool is reached through the
    # proxy only; operators find the port in `studio-agent sessions`).
    message = f"{h.spec.tool or 'tool'} is answering"
    failed = [s.message for s in h.data_links if s.state == STATE_FAILED]
    if failed:
        # Optional data-links that could not be mounted: the session runs without.
        message += "; not mounted: " + "; ".join(failed)
    return message
