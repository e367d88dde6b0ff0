"""No-op defaults for the Policy hooks, so a policy writes only the hooks it needs."""

from __future__ import annotations

from policies.types import BackendId, ClusterView, Decision, RouteRequest

__all__ = ["PolicyBase"]


class PolicyBase:
    name = "base"

    def defer(self, request: RouteRequest, view: ClusterView) -> bool:
        return False

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        return None

    def on_finished(
        self, request: RouteRequest, decision: Decision, now_s: float, ok: bool
    ) -> None:
        return None

    def on_backend_removed(self, backend_id: BackendId) -> None:
        return None
