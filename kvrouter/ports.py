"""Ports for the local servers kvrouter's own tools start: the demo, the benchmarks, the tests.

A port is picked at random below the kernel's ephemeral range, checked free, and never handed
out twice by one process. An ephemeral pick (``bind(("127.0.0.1", 0))``, then close) stays
free only until the kernel hands it to someone else, and every process starting beside ours
binds port 0 and connects outward while ours loads: the demo once lost its router's port to a
pod's ZeroMQ socket, and CI a vLLM engine's replay port, picked ~25 s before the engine bound
it. The kernel never assigns a port below its range, so a port picked there stays ours.
(``scripts/vllm_cpu.py`` keeps its own copy of this rule: that script imports nothing from the
project.)
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port", "free_ports"]

FLOOR = 20000  # below: well-known and registered services' usual ports
_TRIES = 200
_handed_out: set[int] = set()
_pick = random.Random()  # seeded from the OS: two processes draw different ports


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _binds(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int = 1) -> int:
    """The first of ``count`` consecutive ports free right now on 127.0.0.1 that the kernel
    will not hand to anyone else."""
    ceiling = _ephemeral_low() - count
    if ceiling - FLOOR < 1000:  # a tuned range leaves no room below it: let the OS pick
        for _ in range(_TRIES):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                base = int(s.getsockname()[1])
            if base + count < 65536 and all(_binds(base + i) for i in range(1, count)):
                return base
        raise OSError(f"no run of {count} free ports on 127.0.0.1")
    for _ in range(_TRIES):
        base = _pick.randrange(FLOOR, ceiling)
        run = range(base, base + count)
        if any(p in _handed_out for p in run) or not all(_binds(p) for p in run):
            continue
        _handed_out.update(run)
        return base
    raise OSError(f"no run of {count} free ports in [{FLOOR}, {ceiling + count}) on 127.0.0.1")


def free_port() -> int:
    """One port free right now on 127.0.0.1 that the kernel will not hand to anyone else."""
    return free_ports(1)
