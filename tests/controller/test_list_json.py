"""`GET /studios` builds its JSON without the response models (issue 16: views.studio_json);
these tests hold it to what the models give, and its one-statement query and SQLite's
search shortcut (studios_service._contains_folded) to the semantics they replace."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from controller.models import Checkpoint, Studio, utcnow
from controller.responses import DataStudioDto
from tests.conftest import ControllerHarness
from tests.controller.test_access import add_user


async def _create(h: ControllerHarness, name: str, **extra: Any) -> str:
    _, body = await h.request(
        "POST",
        "/studios?autoStart=false",
        {"name": name, "computeEnvId": h.compute_env_id, **extra},
        expect=200,
    )
    return str(body["studio"]["sessionId"])


async def _varied_studios(h: ControllerHarness) -> list[str]:
    """Studios that between them have every optional part of a DataStudioDto."""
    bob_id, _ = await add_user(h, "bob", "maintain")
    _, label = await h.request(
        "POST", "/labels", {"name": "env", "value": "prod", "resource": True}, expect=200
    )
    _, other = await h.request(
        "POST", "/labels", {"name": "team", "value": "data", "resource": True}, expect=200
    )
    plain = await _create(h, "plain", labelIds=[])
    described = await _create(
        h,
        "described",
        description="with a description",
        configuration={"condaEnvironment": "dependencies: [numpy]", "lifespanHours": 3},
        labelIds=[label["id"], other["id"]],
    )
    private = await _create(h, "private", isPrivate=True, allowedUserIds=[bob_id])
    running = await _create(h, "running", labelIds=[])
    clone = await _create(h, "clone")
    assert h.controller is not None and h.controller.db is not None
    now = utcnow()
    async with h.controller.db.transaction() as session:
        checkpoint = Checkpoint(
            session_id=plain,
            name="first",
            key="k1",
            uri="file:///tmp/cp/1",
            status="finalized",
            author_user_id=1,
        )
        session.add(checkpoint)
        await session.flush()
        cloned = await session.get(Studio, clone)
        assert cloned is not None
        cloned.parent_checkpoint_id = checkpoint.id
        studio = await session.get(Studio, running)
        assert studio is not None
        studio.status = "running"
        # A data-link deleted since: shown INVALID, and said in the status message.
        studio.configuration = {"mountData": ["v1-gone-link"]}
        studio.status_message = "up"
        studio.stop_reason = None
        studio.last_started = now - timedelta(minutes=5)
        studio.progress = [
            {"message": "pulling", "status": "succeeded", "warnings": ["slow"]},
            {"message": "starting", "status": "in-progress"},
        ]
        studio.active_connections = [
            {
                "id": 1,
                "userName": "admin",
                "email": "a@example.org",
                "lastActive": "2026-12-01T10:00:00.000Z",
            },
            {"id": bob_id, "userName": "bob", "avatar": "https://example.org/b.png"},
        ]
    return [plain, described, private, running, clone]


async def test_list_items_are_what_the_models_give(
    controller_harness: ControllerHarness,
) -> None:
    """Each studio of a page is byte for byte (keys in order) what GET /studios/{id}
    answers, which validates and serialises DataStudioDto; with and without labels."""
    h = controller_harness
    ids = await _varied_studios(h)
    for query in ("", "&attributes=labels"):
        _, page = await h.request("GET", f"/studios?max=100{query}", expect=200)
        assert page["totalSize"] == len(ids)
        assert [s["sessionId"] for s in page["studios"]] == ids[::-1]
        for item in page["studios"]:
            _, single = await h.request(
                "GET", f"/studios/{item['sessionId']}?x=1{query}", expect=200
            )
            assert json.dumps(item) == json.dumps(single)
            again = DataStudioDto.model_validate(item).dump()
            assert json.dumps(again) == json.dumps(item)
    _, page = await h.request("GET", "/studios?attributes=labels", expect=200)
    by_name = {s["name"]: s for s in page["studios"]}
    assert [x["name"] for x in by_name["described"]["labels"]] == ["env", "team"]
    assert by_name["plain"]["labels"] == []
    assert by_name["clone"]["parentCheckpoint"]["studioName"] == "plain"
    assert [u["userName"] for u in by_name["private"]["allowedUsers"]] == ["bob"]
    assert by_name["running"]["activeConnections"][1]["avatar"].endswith("b.png")
    assert "waveBuildUrl" in by_name["described"]
    assert by_name["running"]["mountedDataLinks"][0]["status"] == "INVALID"
    _, page = await h.request("GET", "/studios", expect=200)
    assert all("labels" not in s for s in page["studios"])


async def test_search_folds_case_as_python_does(controller_harness: ControllerHarness) -> None:
    """SQLite matches all-ASCII values with its own LIKE and only the others with
    Python's lower(): the matches are those of `word.lower() in value.lower()`."""
    await _check_search(controller_harness)


async def test_search_on_postgresql(tmp_path: Path, postgres_database: str) -> None:
    """The same matches on PostgreSQL, where migration 0016 adds trigram indexes."""
    h = ControllerHarness(tmp_path / "data", database_url=postgres_database)
    await h.start()
    try:
        assert h.controller is not None and h.controller.db is not None
        async with h.controller.db.transaction() as session:
            indexes = set(
                (
                    await session.scalars(
                        text("SELECT indexname FROM pg_indexes WHERE tablename = 'studios'")
                    )
                ).all()
            )
        assert {"ix_studios_name_trgm", "ix_studios_template_trgm"} <= indexes
        # PostgreSQL's lower() folds "İ" to a plain "i", Python's to "i" and a combining
        # dot: that one word is the exception, as it was before the indexes.
        await _check_search(h, skip=frozenset({"i̇stanbul"}))
        _, body = await h.request("GET", "/studios", params={"max": 3, "offset": 6}, expect=200)
        assert len(body["studios"]) == 2 and body["totalSize"] == 8
    finally:
        await h.close()


async def _check_search(h: ControllerHarness, skip: frozenset[str] = frozenset()) -> None:
    names = [
        "ALPHA upper",
        "alpha lower",
        "Ünïcode STUDIO",
        "straße Alpha",
        "\u212aelvin sign",  # KELVIN SIGN: Python lowers it to an ASCII "k"
        "İstanbul",  # lowers to "i" + COMBINING DOT ABOVE
        "50% off_",
        "under_score",
    ]
    for name in names:
        await _create(h, name)
    words = ["alpha", "ALPHA", "ünïcode", "ÜNÏCODE", "studio", "kelvin", "i̇stanbul"]
    words += ["stanbul", "%", "_", "e_s", "ß", "SS", "python-http", "PYTHON", "zzz"]
    for word in (w for w in words if w not in skip):
        _, body = await h.request(
            "GET", "/studios", params={"search": f'"{word}"', "max": 100}, expect=200
        )
        expected = sorted(
            n
            for n in names
            if word.lower() in n.lower() or word.lower() in "studios/python-http:3.11-0.1"
        )
        assert sorted(s["name"] for s in body["studios"]) == expected, word
        assert body["totalSize"] == len(expected), word


async def test_pages_and_totals(controller_harness: ControllerHarness) -> None:
    """Newest first, ties by id; the count on every page, also past the end and with
    max=0 (where the page's statement has no row to carry it)."""
    h = controller_harness
    for n in range(7):
        await _create(h, f"s{n}")
    assert h.controller is not None and h.controller.db is not None
    _, everything = await h.request("GET", "/studios", expect=200)
    expected = [s["sessionId"] for s in everything["studios"]]
    # Same creation time for all: the order falls back on the session id, descending.
    async with h.controller.db.transaction() as session:
        same = utcnow()
        for sid in expected:
            studio = await session.get(Studio, sid)
            assert studio is not None
            studio.date_created = same
    _, body = await h.request("GET", "/studios", expect=200)
    assert [s["sessionId"] for s in body["studios"]] == sorted(expected, reverse=True)
    for offset, size, count in ((0, 3, 3), (6, 3, 1), (7, 3, 0), (1000, 50, 0), (2, 0, 0)):
        _, body = await h.request(
            "GET", "/studios", params={"offset": offset, "max": size}, expect=200
        )
        assert len(body["studios"]) == count and body["totalSize"] == 7, (offset, size)
    _, body = await h.request("GET", "/studios", params={"search": "s1 status:stopped"}, expect=200)
    assert [s["name"] for s in body["studios"]] == ["s1"] and body["totalSize"] == 1
