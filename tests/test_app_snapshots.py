"""Snapshots of the chat app at a fixed terminal size (pytest-textual-snapshot). After a deliberate
change to the layout, refresh them with: scripts/test tests/test_app_snapshots.py --snapshot-update"""

from pathlib import Path

APP = str(Path(__file__).parent / "support" / "snapshot_apps.py")


async def _ready(pilot):
    for _ in range(50):
        await pilot.pause(0.02)
        if pilot.app.backend is not None:
            break
    pilot.app.clear_notifications()
    await pilot.pause()


def test_conversation(snap_compare):
    assert snap_compare(APP, terminal_size=(100, 30), run_before=_ready)


def test_help_screen(snap_compare):
    async def run_before(pilot):
        await _ready(pilot)
        await pilot.press("f1")
        await pilot.pause()

    assert snap_compare(APP, terminal_size=(100, 30), run_before=run_before)
