"""The `rclone mount` data-link backend.

The remote is defined entirely through `RCLONE_CONFIG_DL_*` environment variables
(no config file, nothing on the command line that `ps` would show). `--vfs-cache-mode
writes` stages written files in the private directory so that editors and libraries
that seek while writing work; the upload then happens after close (`--vfs-write-back`),
so a just-closed file reaches the bucket moments later, not at close.
"""

from __future__ import annotations

from pathlib import Path

from agent.host_mounts import MountBackend, MountTarget

__all__ = ["RcloneBackend"]


class RcloneBackend(MountBackend):
    name = "rclone"
    binary = "rclone"

    def __init__(self, cache_mode: str = "writes") -> None:
        self.cache_mode = cache_mode

    def command(
        self, target: MountTarget, mountpoint: Path, private_dir: Path
    ) -> tuple[list[str], dict[str, str]]:
        remote = f"dl:{target.bucket}/{target.prefix}" if target.prefix else f"dl:{target.bucket}"
        argv = [
            "rclone",
            "mount",
            remote,
            str(mountpoint),
            "--daemon",
            "--allow-other",
            "--umask",
            "0000",
            "--vfs-cache-mode",
            self.cache_mode,
            "--vfs-write-back",
            "0s",
            "--cache-dir",
            str(private_dir / "cache"),
            # New objects written by others show up within seconds.
            "--dir-cache-time",
            "5s",
            # A store that went away: fail reads in seconds rather than retry for minutes.
            "--contimeout",
            "5s",
            "--timeout",
            "15s",
            "--low-level-retries",
            "2",
            "--retries",
            "1",
            "--log-file",
            str(private_dir / "rclone.log"),
            "--log-level",
            "NOTICE",
        ]
        if target.read_only:
            argv.append("--read-only")
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(private_dir),
            "RCLONE_CONFIG": "/dev/null",
            "RCLONE_CONFIG_DL_TYPE": "s3",
            "RCLONE_CONFIG_DL_PROVIDER": "Other" if target.endpoint else "AWS",
            "RCLONE_CONFIG_DL_ACCESS_KEY_ID": target.access_key_id,
            "RCLONE_CONFIG_DL_SECRET_ACCESS_KEY": target.secret_access_key,
            # Never try to create the bucket (a data-link names an existing one).
            "RCLONE_CONFIG_DL_NO_CHECK_BUCKET": "true",
        }
        if target.endpoint:
            env["RCLONE_CONFIG_DL_ENDPOINT"] = target.endpoint
            env["RCLONE_CONFIG_DL_FORCE_PATH_STYLE"] = "true"
        if target.region:
            env["RCLONE_CONFIG_DL_REGION"] = target.region
        return argv, env
