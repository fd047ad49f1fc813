"""The typed session handle reads what earlier agents wrote, and writes the same shape.

An upgraded agent must re-adopt the tools its predecessor left running: the handle on
disk is the contract between the two processes.
"""

from __future__ import annotations

import json
from pathlib import Path

from studios.agent.v1 import agent_pb2 as pb

from agent.datalinks import MountStatus
from agent.sessions.handle import SessionHandle, SessionSpec, load_handles, save_handle
from agent.state import StateDir
from agent.volumes import VolumeInfo

# handle.json as the agent before the typed handle (commit a0dbcfc) wrote it.
_OLD_HANDLE = {
    "session_id": "abcd0001",
    "generation": 3,
    "status": "running",
    "runtime": "podman",
    "spec": {
        "image": "localhost/studios/busybox-httpd:1.36-0.1",
        "tool": "httpd",
        "environment": {"A": "1"},
        "checkpoint_base_uri": "s3://bucket/ckpt",
        "boot_disk_size_gb": 10,
        "studio_name": "my studio",
        "data_links": [
            {
                "data_link_id": "dl1",
                "mount_name": "data",
                "resource_ref": "s3://b/x",
                "read_only": True,
                "endpoint": "http://127.0.0.1:8333",
                "region": "us-east-1",
                "required": False,
            }
        ],
        "file_system_mounts": [{"host_path": "/srv/ref", "mount_path": "/ref", "read_only": True}],
    },
    "restore_uri": "s3://bucket/ckpt/manifests/abcd0001/k1",
    "message": "httpd answering on port 4000",
    "pid": 1234,
    "create_time": 17000.5,
    "port": 4000,
    "root_dir": "/var/lib/studios/sessions/abcd0001/root",
    "log_path": "/var/lib/studios/sessions/abcd0001/tool.log",
    "volume": {"kind": "xfs-loop", "path": "/x", "size_bytes": 2147483648, "used_bytes": 10},
    "progress": [
        {
            "name": "preparing the volume",
            "status": "succeeded",
            "message": "ok",
            "warnings": [],
            "percent": -1,
        },
    ],
    "started_at": 1700000000,
    "exited": False,
    "exit_code": 0,
    "unsaved": False,
    "checkpoint_uri": "s3://bucket/ckpt/manifests/abcd0001/k2",
    "final_uri": "",
    "runtime_data": {"container_id": "c0ffee", "merged": "/m"},
    "data_links": [
        {
            "data_link_id": "dl1",
            "mount_name": "data",
            "state": "read-only",
            "message": "",
            "host_path": "/h",
            "read_only": True,
        }
    ],
}


def test_an_old_handle_loads_typed_and_is_written_back_the_same(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    (state.session_dir("abcd0001")).mkdir(parents=True)
    (state.session_dir("abcd0001") / "handle.json").write_text(json.dumps(_OLD_HANDLE))

    [h] = load_handles(state)
    assert h.spec.image == "localhost/studios/busybox-httpd:1.36-0.1"
    assert h.spec.boot_disk_size_gb == 10
    assert h.spec.data_links[0].resource_ref == "s3://b/x"
    assert h.spec.file_system_mounts[0].mount_path == "/ref"
    assert h.volume == VolumeInfo("xfs-loop", "/x", 2147483648, 10)
    assert h.data_links == [MountStatus("dl1", "data", "read-only", "", "/h", True)]
    assert h.progress[0].status == "succeeded"
    assert h.visible_root == "/m"
    assert h.runtime_handle().data == {"container_id": "c0ffee", "merged": "/m"}
    # Started before the proxy had a secret: none, so the proxy adds no header.
    assert h.proxy_secret == ""

    save_handle(state, h)
    written = json.loads((state.session_dir("abcd0001") / "handle.json").read_text())
    # What the old agent did not know yet (limits, the per-session disk cap, the proxy's
    # secret, custom environments, the final checkpoint's key) appears with its defaults;
    # nothing else moves.
    newer = ("cpu", "memory_mib", "gpu", "session_disk_cap_gb", "conda_environment")
    assert written["spec"]["session_disk_cap_gb"] == 0
    assert written["spec"]["conda_environment"] == ""
    assert {k: v for k, v in written["spec"].items() if k not in newer} == _OLD_HANDLE["spec"]
    defaults = {
        "proxy_secret": "",
        "build_pid": 0,
        "build_create_time": 0.0,
        "image": "",
        "build": {},
        "final_key": "",
    }
    assert {k: written[k] for k in defaults} == defaults
    assert {k: v for k, v in written.items() if k != "spec" and k not in defaults} == {
        k: v for k, v in _OLD_HANDLE.items() if k != "spec"
    }


def test_an_ended_handle_without_a_volume_round_trips(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    h = SessionHandle(session_id="abcd0002", generation=1, status="stopped", runtime="local")
    save_handle(state, h)
    [back] = load_handles(state)
    assert back == h and back.volume is None and back.ended
    assert json.loads((state.session_dir("abcd0002") / "handle.json").read_text())["volume"] == {}


def test_the_spec_keeps_no_keys_of_its_data_links() -> None:
    spec = pb.SessionSpec(image="img", tool="t", cpu=2, memory_mib=512)
    spec.data_links.add(
        data_link_id="dl", mount_name="data", access_key_id="AKIA", secret_access_key="s3cr3t"
    )
    typed = SessionSpec.from_pb(spec)
    assert typed.cpu == 2 and typed.memory_mib == 512
    text = json.dumps(typed.to_json())
    assert "AKIA" not in text and "s3cr3t" not in text
    assert SessionSpec.from_json(json.loads(text)) == typed
