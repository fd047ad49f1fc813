"""The periodic full resync is spread over its interval, one schedule per agent stream."""

from __future__ import annotations

import time
from pathlib import Path

from controller.agent_hub import FULL, AgentHub
from controller.db import Database
from controller.placement import Placer
from controller.reconciler import Reconciler


async def test_each_stream_is_resynced_on_its_own_schedule(tmp_path: Path) -> None:
    hub = AgentHub()
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    try:
        reconciler = Reconciler(Placer(db, hub), hub, interval=5.0, resync_interval=60.0)
        streams = [hub.register(f"agent-{i}", "env") for i in range(50)]
        before = time.monotonic()
        assert reconciler.resync_due() == 0  # scheduled, none due yet
        offsets = [s.next_resync - before for s in streams]
        assert all(30.0 <= o <= 60.5 for o in offsets)
        # Spread: not one instant for all of them.
        assert max(offsets) - min(offsets) > 5.0
        streams[3].next_resync = time.monotonic() - 1
        assert reconciler.resync_due() == 1
        assert streams[3].queue.get_nowait() == FULL
        assert all(s.queue.empty() for s in streams)
        assert streams[3].next_resync > time.monotonic() + 59
        # 0: off.
        reconciler.resync_interval = 0
        streams[4].next_resync = 1.0
        assert reconciler.resync_due() == 0 and streams[4].queue.empty()
    finally:
        await db.close()
