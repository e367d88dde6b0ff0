"""kvrouter.ports: the ports the demo, the benchmarks and the tests start servers on."""

from __future__ import annotations

import socket

import pytest

from kvrouter import ports


def test_ports_are_below_the_ephemeral_range_free_and_never_handed_out_twice() -> None:
    low = ports._ephemeral_low()
    seen: set[int] = set()
    for count in (1, 4, 1, 8):
        base = ports.free_ports(count)
        run = set(range(base, base + count))
        assert ports.FLOOR <= base and base + count <= low  # nothing the kernel assigns
        assert not run & seen  # not handed out before by this process
        seen |= run
        for port in run:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))  # free: raises if not


def test_a_port_that_does_not_bind_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first draw lands on a port another socket holds: the next draw is returned."""
    taken = ports.free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", taken))
        held.listen()
        draws = iter([taken, taken + 1])

        class Draw:
            def randrange(self, start: int, stop: int) -> int:
                return next(draws)

        monkeypatch.setattr(ports, "_pick", Draw())
        monkeypatch.setattr(ports, "_handed_out", set())  # `taken` is fair game to the draw
        assert ports.free_port() == taken + 1
