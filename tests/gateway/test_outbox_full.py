"""The outbox on a real, full file system: commits wait in memory in order, within a bound that drops the oldest
readings first (never statuses or alarms), and everything kept is committed, in order, once space returns."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import outbox as outbox_module
from gateway.outbox import Outbox
from tests.helpers import fill, record_for


async def test_a_full_disk_keeps_records_in_memory_bounded_then_commits_them_in_order(
    small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "MAX_UNSAVED", 50)
    box = Outbox(small_fs / "outbox.sqlite3", sinks=("mqtt",))
    await box.open()
    filler = fill(small_fs)
    for i in range(1, 200):  # enough rows to need new pages
        kind = "alarm" if i % 40 == 0 else "reading"
        box.put("r/d", box.next_seq("r/d"), record_for("r/d", i, kind, pad=500))  # seq i
        await box.flush()
    assert box.storage_error is not None and "full" in box.storage_error
    assert box.unsaved <= 50 and box.unsaved_dropped > 0
    kept = [r.seq for r in box.take_unsaved()]
    assert kept == sorted(kept)
    filler.unlink()
    await box.flush()
    assert box.storage_error is None
    items = await box.read(0, limit=1000)
    committed = [it.decoded().seq for it in items]
    assert committed == sorted(committed), "committed in the order they were put"
    assert {40, 80, 120, 160} <= set(committed), "alarms are never dropped"
    assert len(committed) + box.unsaved_dropped == 199
    await box.close()
