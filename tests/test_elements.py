"""The element tracker alone (no engine, no nft): what a sync would send for each change of
the owners' contributions, including the slots it holds as one text per owner."""

from __future__ import annotations

from pykp.netfilter.elements import ElementTracker

F = "10.96.0.10 . tcp . 80"


def slots(frontend: str, *backends: str) -> dict[str, str]:
    return {f"{frontend} . {i}": f"{frontend} . {i} : {b} . 8080" for i, b in enumerate(backends)}


def web(*backends: str, frontend: str = F) -> dict[str, dict[str, str]]:
    return {
        "frontends4": {frontend: frontend},
        "slots4": slots(frontend, *backends),
        "service_ips4": {"10.96.0.10": "10.96.0.10"},
    }


def loaded(**owners: dict[str, dict[str, str]]) -> ElementTracker:
    tracker = ElementTracker(loading=True)
    for owner, contribution in owners.items():
        tracker.set(owner, contribution)
    tracker.loaded()
    return tracker


def test_a_full_load_wants_every_slot_and_counts_them() -> None:
    tracker = loaded(a=web("10.244.1.1", "10.244.1.2"), b=web("10.244.2.1", frontend="x . tcp . 1"))
    wanted = tracker.wanted()
    assert wanted["slots4"] == {
        **slots(F, "10.244.1.1", "10.244.1.2"),
        **slots("x . tcp . 1", "10.244.2.1"),
    }
    assert tracker.counts()["slots4"] == 3
    assert tracker.counts()["service_ips4"] == 1  # shared by both owners
    assert len(tracker) == 3 + 2 + 1


def test_one_changed_slot_is_replaced_and_a_dropped_one_removed() -> None:
    tracker = loaded(a=web("10.244.1.1", "10.244.1.2", "10.244.1.3"))
    tracker.set("a", web("10.244.1.1", "10.244.1.9"))
    delta = tracker.take_delta()
    assert delta.replaced == {"slots4": [(f"{F} . 1", f"{F} . 1 : 10.244.1.9 . 8080")]}
    assert delta.removed == {"slots4": [f"{F} . 2"]}
    assert delta.added == {}
    assert tracker.counts()["slots4"] == 2
    assert not tracker.take_delta()  # taken once


def test_a_frontend_changing_hands_keeps_its_slots_in_place() -> None:
    # The older service takes the frontend back: one sync removes it from one owner and
    # gives it to the other. Nothing may be removed from the kernel, even for a moment.
    tracker = loaded(young=web("10.244.1.1", "10.244.1.2"))
    tracker.set("young", None)
    tracker.set("old", web("10.244.1.1", "10.244.3.3"))
    delta = tracker.take_delta()
    assert delta.removed == {}
    assert delta.replaced == {"slots4": [(f"{F} . 1", f"{F} . 1 : 10.244.3.3 . 8080")]}
    assert delta.added == {}


def test_a_gone_owner_takes_its_slots_and_not_a_shared_address() -> None:
    tracker = loaded(a=web("10.244.1.1"), b=web("10.244.2.1", frontend="x . tcp . 1"))
    tracker.set("b", None)
    delta = tracker.take_delta()
    assert delta.removed == {"frontends4": ["x . tcp . 1"], "slots4": ["x . tcp . 1 . 0"]}
    assert tracker.counts()["service_ips4"] == 1
    assert tracker.counts()["slots4"] == 1
