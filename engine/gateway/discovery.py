"""Engine endpoints and canary weights learnt at run time from the Kubernetes API.

On a cluster the operator gives each engine track (stable, canary) a Service labelled with its
track and revision; Kubernetes mirrors those labels onto the Services' EndpointSlices. The
gateway watches those slices (ready endpoints only) and its own ConfigMap's `weights.json` with
its ServiceAccount, so pods that come and go and the canary's share of traffic apply within
seconds, without a restart. Static `--replica` mode (local fleet, tests) does not use this.

The decisions are pure (`endpoints_of`, `parse_weights`, `plan`); `Discovery` only lists,
watches and hands the result to the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tokenfleet.operator.model import REVISION_LABEL, TRACK_LABEL

log = logging.getLogger(__name__)

WEIGHTS_KEY = "weights.json"  # the gateway ConfigMap entry the operator writes at each canary step
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SLICES_PATH = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
CONFIGMAPS_PATH = "/api/v1/namespaces/{namespace}/configmaps"
WATCH_TIMEOUT_S = 300  # the server ends a watch after this; we re-watch from the last version
RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class EngineEndpoint:
    """One ready engine pod: where to reach it and which revision it serves."""

    id: str
    url: str
    revision: str
    track: str


@dataclass(frozen=True, slots=True)
class Plan:
    """What the replica set must become, and what changed (for the log)."""

    members: tuple[tuple[str, str], ...]
    revisions: Mapping[str, str]
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def parse_selector(selector: str) -> list[tuple[str, str | None]]:
    """`a=b,c` → [(a, b), (c, None)]: equality and existence terms (all the operator renders)."""
    terms: list[tuple[str, str | None]] = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, sep, value = term.partition("=")
        terms.append((key.strip(), value.strip() if sep else None))
    return terms


def matches(labels: Mapping[str, str], terms: Iterable[tuple[str, str | None]]) -> bool:
    return all(key in labels and (value is None or labels[key] == value) for key, value in terms)


def _port(slice_: Mapping[str, Any]) -> int | None:
    ports = [p for p in slice_.get("ports") or [] if isinstance(p, Mapping) and p.get("port")]
    named = [p for p in ports if p.get("name") == "http"]
    chosen = named or ports
    return int(chosen[0]["port"]) if chosen else None


def endpoints_of(slices: Iterable[Mapping[str, Any]], selector: str = "") -> list[EngineEndpoint]:
    """Ready endpoints of the matching slices, one per pod, sorted by id.

    `conditions.ready` unset means ready (the API's convention); terminating pods are never
    ready, so a pod that leaves is dropped at once and its in-flight requests finish.
    """
    terms = parse_selector(selector)
    found: dict[str, EngineEndpoint] = {}
    for slice_ in slices:
        labels = (slice_.get("metadata") or {}).get("labels") or {}
        track = labels.get(TRACK_LABEL)
        if not track or not matches(labels, terms):
            continue
        kind = slice_.get("addressType", "IPv4")
        port = _port(slice_)
        if port is None or kind not in ("IPv4", "IPv6"):
            continue
        for endpoint in slice_.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False or not endpoint.get("addresses"):
                continue
            address = endpoint["addresses"][0]
            host = f"[{address}]" if kind == "IPv6" else address
            pod = (endpoint.get("targetRef") or {}).get("name")
            rid = str(pod or f"{address}:{port}")
            found[rid] = EngineEndpoint(
                rid, f"http://{host}:{port}", str(labels.get(REVISION_LABEL, "")), track
            )
    return [found[rid] for rid in sorted(found)]


def parse_weights(data: Mapping[str, Any] | None) -> dict[str, int] | None:
    """`weights.json` of the ConfigMap's data: {revision: percent}; absent, empty or bad → None."""
    raw = (data or {}).get(WEIGHTS_KEY)
    if not raw:
        return None
    try:
        document = json.loads(raw)
    except ValueError:
        log.warning("ignoring unparsable %s: %r", WEIGHTS_KEY, raw[:200])
        return None
    if not isinstance(document, dict):
        return None
    weights = {
        str(k): int(v) for k, v in document.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    return {k: v for k, v in weights.items() if v >= 0} or None


def plan(current: Mapping[str, tuple[str, str]], endpoints: Iterable[EngineEndpoint]) -> Plan:
    """`current` is {id: (url, revision)} of the replica set; the plan makes it `endpoints`."""
    wanted = {e.id: e for e in endpoints}
    added = tuple(
        rid for rid, e in wanted.items() if rid not in current or current[rid] != (e.url, e.revision)
    )
    removed = tuple(rid for rid in current if rid not in wanted or current[rid][0] != wanted[rid].url)
    return Plan(
        members=tuple((rid, e.url) for rid, e in wanted.items()),
        revisions={rid: e.revision for rid, e in wanted.items()},
        added=added,
        removed=removed,
    )


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Where to look: the engine slices' label selector and the ConfigMap holding the weights."""

    namespace: str
    selector: str
    weights_configmap: str | None = None


@dataclass
class ApiAccess:
    """The API server and the pod's ServiceAccount credentials (re-read: tokens are rotated)."""

    server: str
    token_file: Path | None = None
    ca_file: Path | None = None

    @classmethod
    def in_cluster(cls, environ: Mapping[str, str] | None = None) -> ApiAccess:
        env = os.environ if environ is None else environ
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError("endpoint discovery needs KUBERNETES_SERVICE_HOST (run it in a pod)")
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", SERVICE_ACCOUNT_DIR / "token", SERVICE_ACCOUNT_DIR / "ca.crt")

    def headers(self) -> dict[str, str]:
        if self.token_file is None:
            return {}
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)


def namespace_of_pod(default: str = "default") -> str:
    path = SERVICE_ACCOUNT_DIR / "namespace"
    return path.read_text().strip() if path.exists() else default


class ApiError(Exception):
    def __init__(self, status: int, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}")
        self.status = status


OnEndpoints = Callable[[list[EngineEndpoint]], None]
OnWeights = Callable[[dict[str, int] | None], None]


@dataclass
class Discovery:
    """List-then-watch of the engine slices and the weights ConfigMap, forever (until cancelled)."""

    config: DiscoveryConfig
    access: ApiAccess
    on_endpoints: OnEndpoints
    on_weights: OnWeights
    _slices: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    _session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        self._session = aiohttp.ClientSession(
            base_url=self.access.server,
            connector=aiohttp.TCPConnector(ssl=self.access.ssl_context()),
            # A watch idles for minutes between events, but bookmarks arrive about every minute:
            # a read silent past the watch's own timeout is a dead connection.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=WATCH_TIMEOUT_S + 30),
        )
        try:
            tasks = [self._forever(self._follow_slices)]
            if self.config.weights_configmap:
                tasks.append(self._forever(self._follow_weights))
            await asyncio.gather(*tasks)
        finally:
            await self._session.close()

    async def _forever(self, follow: Callable[[], Any]) -> None:
        while True:
            try:
                await follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any API trouble: keep the last state, retry
                log.warning("endpoint discovery: %s; retrying in %.0f s", exc, RETRY_S)
                await asyncio.sleep(RETRY_S)

    async def _get(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        assert self._session is not None
        async with self._session.get(path, params=params, headers=self.access.headers()) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, f"GET {path}")
            body: dict[str, Any] = await resp.json()
            return body

    async def _watch(self, path: str, params: Mapping[str, str]) -> AsyncIterator[dict[str, Any]]:
        assert self._session is not None
        query = {
            **params,
            "watch": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT_S),
        }
        async with self._session.get(path, params=query, headers=self.access.headers()) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, f"watch {path}")
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)

    async def _follow_slices(self) -> None:
        path = SLICES_PATH.format(namespace=self.config.namespace)
        params = {"labelSelector": self.config.selector}
        listing = await self._get(path, params)
        self._slices = {_key(item): item for item in listing.get("items") or []}
        self._publish()
        version = str((listing.get("metadata") or {}).get("resourceVersion", ""))
        async for event in self._watch(path, {**params, "resourceVersion": version}):
            kind, item = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                return  # e.g. 410 Gone: list again
            if kind == "DELETED":
                self._slices.pop(_key(item), None)
            elif kind in ("ADDED", "MODIFIED"):
                self._slices[_key(item)] = item
            else:
                continue  # BOOKMARK
            self._publish()

    def _publish(self) -> None:
        self.on_endpoints(endpoints_of(self._slices.values(), self.config.selector))

    async def _follow_weights(self) -> None:
        name = self.config.weights_configmap
        assert name is not None
        path = CONFIGMAPS_PATH.format(namespace=self.config.namespace)
        try:
            found = await self._get(f"{path}/{name}", {})
        except ApiError as exc:
            if exc.status != 404:
                raise
            found = {}  # not there yet: no weights, and the watch tells when it appears
        self.on_weights(parse_weights(found.get("data")))
        version = str((found.get("metadata") or {}).get("resourceVersion", ""))
        params = {"fieldSelector": f"metadata.name={name}", "resourceVersion": version}
        async for event in self._watch(path, params):
            kind, item = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                return
            if (item.get("metadata") or {}).get("name") != name:
                continue  # a server that ignores the field selector
            if kind == "DELETED":
                self.on_weights(None)
            elif kind in ("ADDED", "MODIFIED"):
                self.on_weights(parse_weights(item.get("data")))


def _key(item: Mapping[str, Any]) -> str:
    return str((item.get("metadata") or {}).get("name", ""))
