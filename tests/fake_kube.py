"""A small fake Kubernetes API server (aiohttp on 127.0.0.1) serving list and watch of pods.

No real API server can run here, so this one implements the parts of the wire protocol the
router uses, as the real one does: ``GET /api/v1/namespaces/{ns}/pods`` with
``labelSelector`` (=, ==, !=, exists, !exists, in, notin), ``resourceVersion``,
``watch=1``, ``timeoutSeconds`` and ``allowWatchBookmarks``; a watch stream is one JSON
object per line; an object that stops matching the selector is sent as DELETED and one that
starts matching as ADDED (what the watch cache does); a version older than the compaction
point answers ``410 Gone``, either as the HTTP status or, like a real server once the watch
has started, as an ERROR event with a ``Status`` of code 410. ``drop_watches`` cuts every open
watch connection mid-stream; ``fail_next`` answers the next requests with 500.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import ssl
from typing import Any

from aiohttp import web

__all__ = ["FakeKube", "make_pod", "selector_matches"]


def make_pod(
    name: str,
    ip: str | None = "127.0.0.1",
    ready: bool = True,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "labels": dict(labels or {}),
            "annotations": dict(annotations or {}),
        },
        "status": {
            "phase": "Running",
            **({"podIP": ip} if ip else {}),
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": "True" if ready else "False"},
            ],
        },
    }


_REQ = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(selector: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for req in _split_selector(selector):
        m = _REQ.match(req)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (op == "in") != (labels.get(key) in values):
                return False
        elif "!=" in req:
            key, value = (s.strip() for s in req.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in req:
            key, value = (s.strip() for s in req.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif req.startswith("!"):
            if req[1:].strip() in labels:
                return False
        elif req not in labels:
            return False
    return True


class FakeKube:
    def __init__(self, token: str | None = "test-token", gone_as_event: bool = False) -> None:
        self.token = token
        self.gone_as_event = gone_as_event
        self.version = 100
        self.compacted_below = 0
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, dict[str, Any] | None, dict[str, Any] | None]] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.fail_next = 0
        self._changed = asyncio.Condition()
        self._watches: set[web.StreamResponse] = set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods_handler)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        scheme = "https" if ssl_context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- cluster changes ------------------------------------------------------------------

    async def _record(self, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        self.version += 1
        if new is not None:
            new["metadata"]["resourceVersion"] = str(self.version)
        async with self._changed:
            self.history.append((self.version, copy.deepcopy(old), copy.deepcopy(new)))
            self._changed.notify_all()

    async def apply(self, pod: dict[str, Any]) -> None:
        """Create or replace a pod (ADDED or MODIFIED)."""
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        old = self.pods.get(key)
        self.pods[key] = copy.deepcopy(pod)
        await self._record(old, self.pods[key])

    async def patch(self, name: str, change: Any, namespace: str = "default") -> None:
        pod = copy.deepcopy(self.pods[(namespace, name)])
        change(pod)
        await self.apply(pod)

    async def delete(self, name: str, namespace: str = "default") -> None:
        gone = self.pods.pop((namespace, name))
        gone["metadata"]["resourceVersion"] = str(self.version + 1)
        await self._record(gone, None)

    def compact(self) -> None:
        """Forget history: watches from any version before now get 410 Gone."""
        self.compacted_below = self.version + 1
        self.history.clear()

    def drop_watches(self) -> None:
        for resp in list(self._watches):
            transport = resp._req.transport if resp._req is not None else None
            if transport is not None:
                transport.abort()
        self._watches.clear()

    @property
    def watch_count(self) -> int:
        return len(self._watches)

    # -- HTTP ------------------------------------------------------------------------------

    async def _pods_handler(self, request: web.Request) -> web.StreamResponse:
        ns = request.match_info["ns"]
        query = dict(request.query)
        self.requests.append((request.path, query))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        if self.fail_next > 0:
            self.fail_next -= 1
            return _status(500, "InternalError", "injected failure")
        selector = query.get("labelSelector", "")
        if query.get("watch") not in ("1", "true"):
            items = [
                copy.deepcopy(p)
                for (pns, _), p in sorted(self.pods.items())
                if pns == ns and selector_matches(selector, p["metadata"]["labels"])
            ]
            return web.json_response(
                {
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self.version)},
                    "items": items,
                }
            )
        since = int(query.get("resourceVersion") or self.version)
        if since < self.compacted_below - 1 and not self.gone_as_event:
            return _status(410, "Expired", f"too old resource version: {since}")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        self._watches.add(resp)
        try:
            if since < self.compacted_below - 1:
                status = _status_doc(410, "Expired", f"too old resource version: {since}")
                await resp.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
                return resp
            await self._stream(resp, ns, selector, since, float(query.get("timeoutSeconds", 30)))
        finally:
            self._watches.discard(resp)
        return resp

    async def _stream(
        self, resp: web.StreamResponse, ns: str, selector: str, since: int, timeout_s: float
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        sent = since
        while True:
            async with self._changed:
                pending = [h for h in self.history if h[0] > sent]
                if not pending:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        return
                    try:
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    except TimeoutError:
                        return
                    continue
            for version, old, new in pending:
                sent = version
                event = _event_for(old, new, ns, selector)
                if event is not None:
                    await resp.write(json.dumps(event).encode() + b"\n")

    async def bookmark(self) -> None:
        """Send a BOOKMARK carrying the current version to every open watch."""
        doc = {
            "type": "BOOKMARK",
            "object": {"kind": "Pod", "apiVersion": "v1",
                       "metadata": {"resourceVersion": str(self.version)}},
        }
        for resp in list(self._watches):
            await resp.write(json.dumps(doc).encode() + b"\n")


def _event_for(
    old: dict[str, Any] | None, new: dict[str, Any] | None, ns: str, selector: str
) -> dict[str, Any] | None:
    def matches(pod: dict[str, Any] | None) -> bool:
        return (
            pod is not None
            and pod["metadata"]["namespace"] == ns
            and selector_matches(selector, pod["metadata"]["labels"])
        )

    was, now = matches(old), matches(new)
    if now and was:
        return {"type": "MODIFIED", "object": new}
    if now:
        return {"type": "ADDED", "object": new}
    if was:
        gone = new if new is not None else old
        return {"type": "DELETED", "object": gone}
    return None


def _status_doc(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(_status_doc(code, reason, message), status=code)
