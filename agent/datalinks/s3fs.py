"""The s3fs-fuse data-link backend.

s3fs stages each written file in its private temporary directory and uploads it on
flush/close (multipart for large files), so a file is in the bucket once `close`
returns; random writes and rewrites work. Keys travel in the environment
(`AWSACCESSKEYID`/`AWSSECRETACCESSKEY`), which only root can read in /proc.
"""

from __future__ import annotations

from pathlib import Path

from agent.host_mounts import MountBackend, MountTarget

__all__ = ["S3fsBackend"]


class S3fsBackend(MountBackend):
    name = "s3fs"
    binary = "s3fs"

    def command(
        self, target: MountTarget, mountpoint: Path, private_dir: Path
    ) -> tuple[list[str], dict[str, str]]:
        # `bucket:/prefix` makes s3fs address every key below the prefix: the rest of
        # the bucket has no name in the mount.
        source = f"{target.bucket}:/{target.prefix}" if target.prefix else target.bucket
        options = [
            "allow_other",
            # Objects without stored modes read as 0777 & ~umask: usable by the
            # container's non-root users too.
            "umask=0000",
            "mp_umask=0000",
            f"tmpdir={private_dir}",
            # A store that went away: fail calls in seconds rather than retry for minutes.
            "connect_timeout=3",
            "readwrite_timeout=10",
            "retries=1",
            "dbglevel=warn",
        ]
        if target.endpoint:
            options += [f"url={target.endpoint}", "use_path_request_style"]
        if target.region:
            options.append(f"endpoint={target.region}")
        if target.read_only:
            options.append("ro")
        argv = ["s3fs", source, str(mountpoint), "-o", ",".join(options)]
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(private_dir),
            "AWSACCESSKEYID": target.access_key_id,
            "AWSSECRETACCESSKEY": target.secret_access_key,
        }
        return argv, env
