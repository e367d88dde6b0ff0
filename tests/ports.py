"""Ports for the servers tests start: one rule for the whole suite (``kvrouter.ports``: below
the kernel's ephemeral range, so a port picked now cannot be taken before our server binds it;
never the same port twice in one process)."""

from __future__ import annotations

from kvrouter.ports import free_port

__all__ = ["free_port"]
