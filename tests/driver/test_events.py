"""Driver task events: none is lost between a plugin restart's RecoverTask and Nomad opening
its TaskEvents stream again (the two run concurrently in Nomad's client)."""

from __future__ import annotations

import queue

from nomad_driver.driver.service import EventHub


def drain(q: queue.Queue) -> list[str]:  # type: ignore[type-arg]
    out = []
    while not q.empty():
        out.append(q.get_nowait().message)
    return out


def test_events_emitted_with_no_stream_open_go_to_the_next_stream() -> None:
    hub = EventHub()
    hub.emit_for("a/t/1", "a", "t", "Task recovered by the pyhpc plugin")
    first = hub.subscribe()
    assert drain(first) == ["Task recovered by the pyhpc plugin"]
    # Held once only: a second stream does not get them again.
    assert drain(hub.subscribe()) == []


def test_open_streams_each_get_every_event_and_nothing_is_held() -> None:
    hub = EventHub()
    a, b = hub.subscribe(), hub.subscribe()
    hub.emit_for("a/t/1", "a", "t", "one")
    assert drain(a) == ["one"] and drain(b) == ["one"]
    hub.unsubscribe(a)
    hub.unsubscribe(b)
    assert drain(hub.subscribe()) == []


def test_held_events_are_bounded_keeping_the_newest() -> None:
    hub = EventHub()
    for i in range(EventHub.HELD + 10):
        hub.emit_for("a/t/1", "a", "t", f"event {i}")
    got = drain(hub.subscribe())
    assert len(got) == EventHub.HELD
    assert got[0] == "event 10" and got[-1] == f"event {EventHub.HELD + 9}"
