"""A minimal Kubernetes API client over raw aiohttp: list and watch pods, nothing else.

Credentials come from the in-cluster service account (token and CA under
``/var/run/secrets/kubernetes.io/serviceaccount``, API server from the
``KUBERNETES_SERVICE_HOST``/``_PORT`` values the caller passes in) or from a kubeconfig file
(the current context's server, bearer token or token file, CA file or data). Client
certificates and exec plugins are refused with a clear error.

    KubeError                 any failed API call (HTTP status, or an ERROR watch event)
    └── KubeGone              410: the resource version is too old; list again
    KubeConfigError           the credentials cannot be used

Must not import ``simulator`` or other ``router`` modules.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

__all__ = [
    "SERVICE_ACCOUNT_DIR",
    "KubeClient",
    "KubeConfig",
    "KubeConfigError",
    "KubeError",
    "KubeGone",
    "PodList",
    "WatchEvent",
    "in_cluster_config",
    "kubeconfig_config",
]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_MAX_LINE_BYTES = 16 * 1024 * 1024
# Bound service-account tokens rotate (kubelet rewrites the file); re-read this often.
_TOKEN_REREAD_S = 60.0


class KubeConfigError(ValueError):
    pass


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API {status}: {message}")
        self.status = status


class KubeGone(KubeError):
    pass


@dataclass(frozen=True, slots=True)
class KubeConfig:
    server: str
    token: str | None = None
    token_path: Path | None = None
    ca_path: Path | None = None
    ca_data: str | None = None
    insecure_skip_tls_verify: bool = False
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class PodList:
    items: tuple[Mapping[str, Any], ...]
    resource_version: str


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str
    object: Mapping[str, Any]


def in_cluster_config(
    environ: Mapping[str, str], secrets_dir: Path = SERVICE_ACCOUNT_DIR
) -> KubeConfig:
    host = environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    token_path = secrets_dir / "token"
    if not token_path.is_file():
        raise KubeConfigError(
            f"not running in a cluster: {token_path} is missing "
            "(set discovery.kubernetes.kubeconfig to run outside one)"
        )
    ca_path = secrets_dir / "ca.crt"
    ns_path = secrets_dir / "namespace"
    return KubeConfig(
        server=f"https://{host}:{port}",
        token_path=token_path,
        ca_path=ca_path if ca_path.is_file() else None,
        namespace=ns_path.read_text().strip() if ns_path.is_file() else None,
    )


def _named(entries: object, name: str, kind: str, path: Path) -> dict[str, Any]:
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(kind)
            if isinstance(body, dict):
                return body
    raise KubeConfigError(f"{path}: no {kind} named {name!r}")


def kubeconfig_config(path: Path, context: str | None = None) -> KubeConfig:
    """The server and credentials of ``context`` (default: current-context) in a kubeconfig."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KubeConfigError(f"{path}: {exc}") from None
    if not isinstance(doc, dict):
        raise KubeConfigError(f"{path}: not a kubeconfig")
    name = context or doc.get("current-context")
    if not name:
        raise KubeConfigError(f"{path}: no current-context and no context given")
    ctx = _named(doc.get("contexts"), name, "context", path)
    cluster = _named(doc.get("clusters"), ctx.get("cluster", ""), "cluster", path)
    user = _named(doc.get("users"), ctx.get("user", ""), "user", path) if ctx.get("user") else {}
    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise KubeConfigError(f"{path}: cluster {ctx.get('cluster')!r} has no server")
    for unsupported in ("client-certificate", "client-certificate-data", "exec", "auth-provider"):
        if unsupported in user:
            raise KubeConfigError(
                f"{path}: user {ctx.get('user')!r} uses {unsupported}; "
                "only bearer tokens (token, tokenFile) are supported"
            )

    def _relative(p: str) -> Path:
        return (path.parent / p) if not Path(p).is_absolute() else Path(p)

    ca_data = cluster.get("certificate-authority-data")
    return KubeConfig(
        server=server.rstrip("/"),
        token=user.get("token"),
        token_path=_relative(user["tokenFile"]) if user.get("tokenFile") else None,
        ca_path=_relative(cluster["certificate-authority"])
        if cluster.get("certificate-authority")
        else None,
        ca_data=base64.b64decode(ca_data).decode() if ca_data else None,
        insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify", False)),
        namespace=ctx.get("namespace"),
    )


class KubeClient:
    """``async with KubeClient(config) as kube:`` opens one HTTP session for list and watch."""

    def __init__(self, config: KubeConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = config.token
        self._token_read_at = float("-inf")

    async def __aenter__(self) -> KubeClient:
        ssl_arg: ssl.SSLContext | bool = True
        if self.config.server.startswith("https://"):
            if self.config.insecure_skip_tls_verify:
                ssl_arg = False
            elif self.config.ca_path or self.config.ca_data:
                ctx = ssl.create_default_context(
                    cafile=str(self.config.ca_path) if self.config.ca_path else None,
                    cadata=self.config.ca_data,
                )
                ssl_arg = ctx
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_arg))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("KubeClient used outside `async with`")
        return self._session

    def _headers(self) -> dict[str, str]:
        path = self.config.token_path
        if path is not None and time.monotonic() - self._token_read_at > _TOKEN_REREAD_S:
            self._token = path.read_text().strip()
            self._token_read_at = time.monotonic()
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _pods_url(self, namespace: str) -> str:
        return f"{self.config.server}/api/v1/namespaces/{quote(namespace, safe='')}/pods"

    async def list_pods(self, namespace: str, label_selector: str) -> PodList:
        params = {"labelSelector": label_selector} if label_selector else {}
        async with self.session.get(
            self._pods_url(namespace), params=params, headers=self._headers(),
            timeout=aiohttp.ClientTimeout(total=60),
        ) as resp:
            await _raise_for_status(resp)
            body = await resp.json(content_type=None)
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise KubeError(resp.status, "pod list without items")
        return PodList(
            items=tuple(p for p in body["items"] if isinstance(p, dict)),
            resource_version=str((body.get("metadata") or {}).get("resourceVersion", "")),
        )

    async def watch_pods(
        self, namespace: str, label_selector: str, resource_version: str, timeout_s: float
    ) -> AsyncIterator[WatchEvent]:
        """Events after ``resource_version`` until the server ends the watch.

        An ERROR event is raised as KubeError (KubeGone for code 410) rather than yielded.
        """
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(int(timeout_s)),
        }
        if label_selector:
            params["labelSelector"] = label_selector
        # The server ends the watch after timeoutSeconds; the read timeout only catches a
        # connection that went silent without closing.
        timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_read=timeout_s + 30)
        async with self.session.get(
            self._pods_url(namespace), params=params, headers=self._headers(), timeout=timeout
        ) as resp:
            await _raise_for_status(resp)
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                if len(buffer) > _MAX_LINE_BYTES:
                    raise KubeError(resp.status, "watch event larger than 16 MiB")
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield _watch_event(line, resp.status)


def _watch_event(line: bytes, status: int) -> WatchEvent:
    try:
        doc = json.loads(line)
    except ValueError:
        raise KubeError(status, f"undecodable watch line: {line[:200]!r}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("object"), dict):
        raise KubeError(status, f"malformed watch event: {line[:200]!r}")
    obj = doc["object"]
    if doc.get("type") == "ERROR":
        code = int(obj.get("code") or 500)
        message = str(obj.get("message") or obj.get("reason") or "watch error")
        raise (KubeGone if code == 410 else KubeError)(code, message)
    return WatchEvent(type=str(doc.get("type")), object=obj)


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    try:
        body = await resp.json(content_type=None)
        message = str(body.get("message") or body.get("reason") or resp.reason)
    except (ValueError, AttributeError, aiohttp.ClientError):
        message = str(resp.reason)
    raise (KubeGone if resp.status == 410 else KubeError)(resp.status, message)
