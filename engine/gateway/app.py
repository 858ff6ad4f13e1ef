"""The gateway's HTTP layer: FastAPI routes, one pooled upstream client, forwarding with failover.

Order of work per request, cheapest refusal first: auth (401, nothing read) → body size (413) →
JSON and field validation (400/404) → class → tenant rate limits (429) → admission (503) →
route → forward. Only the last two touch an engine.

Retry rule: an attempt that fails before anything reached the client (connect error, reset,
timeout, 5xx status, or a stream that dies before its first chunk) is retried on another
replica, at most `routing.retries` times. Streams are relayed lazily: the first upstream chunk
is read before the client gets headers, so "engine died right after accepting" is retryable.
Once a byte was sent the request is never replayed (generation is not idempotent); a stream that
breaks ends with an SSE `error` data event.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry.trace import Span, SpanKind, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from tokenfleet.engine.gateway import limits, routing
from tokenfleet.engine.gateway.admission import AdmissionQueue, ShedError
from tokenfleet.engine.gateway.discovery import ApiAccess, Discovery, DiscoveryConfig, EngineEndpoint, plan
from tokenfleet.engine.gateway.fastpath import Endpoint, FastRoutedApp
from tokenfleet.engine.gateway.metrics import GatewayMetrics, code_class
from tokenfleet.engine.gateway.outcomes import Outcomes
from tokenfleet.engine.gateway.replicas import Replica, ReplicaSet, probe_forever
from tokenfleet.engine.gateway.resume import StreamResume, resumable
from tokenfleet.engine.gateway.tenancy import (
    KeyRing,
    bearer_key,
    engine_fields,
    load_keys,
    resolve_class,
    with_fields,
)
from tokenfleet.engine.gateway.tracing import Tracing
from tokenfleet.engine.gateway.upstream import Upstream, UpstreamError, UpstreamResponse
from tokenfleet.engine.gateway.usage import UsageRelay
from tokenfleet.engine.gateway.validation import (
    RequestError,
    estimated_tokens,
    openapi_components,
    parse_json,
    validate_body,
)
from tokenfleet.engine.gateway.wire import ON_DISCONNECT, Answer
from tokenfleet.engine.sla_contract import ClassError
from tokenfleet.observability.dashboard import LocalMonitor, mount_dashboard
from tokenfleet.spec import LLMService, SLOClass, Tenant

CLASS_HEADER = "x-tokenfleet-class"
REPLICA_HEADER = "x-tokenfleet-replica"
LOCAL_HOSTS = frozenset({"127.0.0.1", "::1", "localhost", "testclient"})
OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
# With auth on, every other path needs a key unless the caller is on this host (operational
# endpoints: /metrics, /dashboard, /openapi.json, /docs expose tenants, traces and alerts).
OPEN_PATHS = frozenset({"/health", "/ready"})
ADMIN_PREFIX = "/admin/"  # localhost-only by their own check: the fleet's CLI calls them keyless
CLIENT_GONE = 499  # nginx's "client closed request": recorded, never sent

log = logging.getLogger(__name__)


@dataclass
class Call:
    """One client request as it moves through the gateway (for metrics, span and limits)."""

    route: str
    span: Span
    headers: dict[str, str]  # the client's, names lower-case (ASGI), read once per request
    method: str = "POST"
    started: float = field(default_factory=time.perf_counter)
    cls: str = "none"
    tenant: str = "none"
    estimate: int = 0
    done: bool = False
    replica: str | None = None  # the replica of the latest attempt
    holds_tenant_slot: bool = False  # counted in the tenant's concurrency until finished
    client_gone: bool = False  # the client's connection closed before its answer


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status}}


def sse_error(message: str) -> bytes:
    payload = json.dumps(error_body(502, message, "upstream_error"))
    return f"data: {payload}\n\n".encode()


def request_id(call: Call) -> str:
    """The client's x-request-id, else a fresh one: what an error answer and its log line share."""
    return call.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex


class Gateway:
    def __init__(
        self,
        service: LLMService,
        *,
        environ: Mapping[str, str] | None = None,
        discovery: DiscoveryConfig | None = None,
        api: ApiAccess | None = None,
    ) -> None:
        self.service = service
        spec = service.spec
        self.spec = spec
        self.routing = spec.routing
        env = os.environ if environ is None else environ
        tenants = {t.name: t for t in spec.scheduler.tenants}
        self.tenants = tenants
        self.keyring: KeyRing | None = None
        if spec.gateway.auth:
            self.keyring = KeyRing.of(load_keys(spec.gateway.api_keys_file, env), set(tenants))
        # Without auth, every request belongs to the first tenant listed.
        self.anonymous = spec.scheduler.tenants[0]
        self.metrics = GatewayMetrics()
        self.tracing = Tracing(f"tokenfleet-gateway-{service.metadata.name}", env)
        self.replicas = ReplicaSet(
            eject_after_failures=self.routing.eject_after_failures,
            cooldown_s=self.routing.eject_cooldown_s,
            on_transition=self._on_transition,
        )
        classes = sorted(spec.scheduler.classes, key=lambda c: c.priority)
        per_class = {c.name: c.queue_limit or spec.gateway.max_queue_per_class for c in classes}
        self.admission = AdmissionQueue(
            order=[c.name for c in classes],
            per_class_limit=per_class,
            total_limit=spec.gateway.max_queue_total or sum(per_class.values()),
            max_wait_s={c.name: c.max_wait_s or 30.0 for c in classes},
        )
        if spec.autoscaling.enabled and spec.autoscaling.scale_to_zero:
            self.admission.activation_wait_s = spec.autoscaling.activation_timeout_s
        self.per_replica_slots = spec.gateway.max_in_flight_per_replica or 2 * spec.engine.max_num_seqs
        # Traffic percent per revision during a canary (set by the control loop); None: all replicas.
        self.weights: dict[str, int] | None = None
        self.outcomes = Outcomes(listener=self.metrics.count_outcome)
        self.buckets: dict[tuple[str, str], limits.Bucket] = {}
        self.tenant_active: dict[str, int] = {}  # requests per tenant in the gateway now
        # Resume streams broken by a dead replica on another one (resume.py).
        self.resume_streams = self.routing.resume_streams
        self._fields_cache: dict[tuple[str, str], tuple[dict[str, object], bytes]] = {}
        self.counter = itertools.count()
        self.rng = random.Random()
        # One pooled client for all upstream traffic (requests and probes), started with the app.
        self.upstream = Upstream(
            connect_timeout_s=self.routing.connect_timeout_s, read_timeout_s=self.routing.first_byte_timeout_s
        )
        self._prober: asyncio.Task[None] | None = None
        # On a cluster: replicas and weights from the Kubernetes API instead of `set_replicas`.
        self.discovery = discovery
        self._api = api
        self._discoverer: asyncio.Task[None] | None = None
        # Whoever runs the replicas (the local fleet) adds its view to /admin/status.
        self.extra_status: Callable[[], dict[str, object]] | None = None
        self.app = self._build_app()

    # -- membership and state ---------------------------------------------------------------

    def set_replicas(
        self, members: Iterable[tuple[str, str]], revisions: Mapping[str, str] | None = None
    ) -> None:
        self.replicas.set(members, revisions)
        self._refresh_slots()

    def set_weights(self, weights: Mapping[str, int] | None) -> None:
        self.weights = dict(weights) if weights else None

    def apply_endpoints(self, endpoints: list[EngineEndpoint]) -> None:
        """Discovered ready engine pods become the replica set; pods that left get no new requests
        and finish the ones they hold (the Replica object lives on in those requests)."""
        current = {rid: (r.url, r.revision) for rid, r in self.replicas.replicas.items()}
        change = plan(current, endpoints)
        if change.changed:
            log.info("replicas: +%s -%s", list(change.added), list(change.removed))
            self.set_replicas(change.members, change.revisions)
            staying = {rid for rid, _ in change.members}
            for rid in change.removed:
                if rid not in staying:
                    self.metrics.forget_replica(rid)

    def _refresh_slots(self) -> None:
        self.admission.set_slots(len(self.replicas.routable()) * self.per_replica_slots)
        for replica in self.replicas.replicas.values():
            self.metrics.replica_up.labels(replica.id).set(1 if replica.breaker.admits else 0)
            # Read at scrape time: nothing to update per request.
            self.metrics.in_flight.labels(replica.id).set_function(partial(self._in_flight_of, replica.id))
        for cls, n in self.admission.queued().items():
            self.metrics.queued.labels(cls).set(n)

    def _in_flight_of(self, replica_id: str) -> float:
        replica = self.replicas.replicas.get(replica_id)
        return replica.in_flight if replica is not None else 0

    def _on_transition(self, replica: Replica, old: str, new: str) -> None:
        if new == "open" and old == "closed":
            self.metrics.ejections.labels(replica.id).inc()
        elif new == "closed" and old == "open":
            self.metrics.readmissions.labels(replica.id).inc()
        self._refresh_slots()

    def status(self) -> dict[str, Any]:
        extra = {"fleet": self.extra_status()} if self.extra_status is not None else {}
        return {
            **extra,
            "service": self.service.metadata.name,
            "model": self.spec.model.name,
            "policy": self.routing.policy,
            "weights": self.weights,
            "ready": bool(self.replicas.routable()),
            "replicas": [r.status() for r in self.replicas.replicas.values()],
            "admission": {
                "slots": self.admission.slots,
                "running": self.admission.running,
                "queued": self.admission.queued(),
                "shed": dict(self.admission.shed_total),
            },
        }

    # -- app ----------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            await self.start()
            try:
                yield
            finally:
                await self.stop()

        app = FastRoutedApp(title="tokenfleet gateway", version="0.1.0", lifespan=lifespan)
        refs, components = openapi_components(self.spec.model.name, self.spec.model.max_model_len)
        # The proxied routes: registered with FastAPI (schema, 405s), served by FastRoutedApp.
        proxied: dict[str, tuple[str, Endpoint]] = {}

        def proxy_route(path: str, method: str, endpoint: Endpoint, **extra: Any) -> None:
            app.add_api_route(path, endpoint, methods=[method], **extra)
            proxied[path] = (method, endpoint)

        for route in OPENAI_ROUTES:
            proxy_route(
                route,
                "POST",
                self._endpoint(route),
                openapi_extra={
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": refs[route]}},
                    }
                },
            )
        proxy_route("/v1/models", "GET", self._models)
        for path in self.spec.gateway.expose_endpoints:
            method = "GET" if path == "/version" else "POST"
            proxy_route(path, method, self._passthrough(path, method))
        app.fast_routes = proxied
        if self.keyring is not None:
            app.guard = self._may_see
        app.add_api_route("/health", self._health, methods=["GET"])
        app.add_api_route("/ready", self._ready, methods=["GET"])
        app.add_api_route("/metrics", self._metrics, methods=["GET"], include_in_schema=False)
        app.add_api_route("/admin/status", self._admin_status, methods=["GET"], include_in_schema=False)
        # The built-in live dashboard (observability issue): idle until a browser or webhook asks.
        mount_dashboard(app, LocalMonitor.for_gateway(self))

        def custom_openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
                schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
                app.openapi_schema = schema
            return app.openapi_schema

        app.openapi = custom_openapi  # type: ignore[method-assign]
        return app

    async def start(self) -> None:
        await self.upstream.start()
        self._prober = asyncio.create_task(
            probe_forever(
                self.upstream,
                self.replicas,
                self.routing.probe_interval_s,
                timeout_s=min(2.0, self.routing.connect_timeout_s + 1.0),
                after=self._refresh_slots,
            )
        )
        if self.discovery is not None:
            discovery = Discovery(
                self.discovery, self._api or ApiAccess.in_cluster(), self.apply_endpoints, self.set_weights
            )
            self._discoverer = asyncio.create_task(discovery.run())

    async def stop(self) -> None:
        for task in (self._prober, self._discoverer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.upstream.close()
        self.tracing.shutdown()

    # -- small endpoints ----------------------------------------------------------------------

    async def _health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def _ready(self) -> JSONResponse:
        ready = bool(self.replicas.routable())
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def _metrics(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _admin_status(self, request: Request) -> JSONResponse:
        if request.client is None or request.client.host not in LOCAL_HOSTS:
            return JSONResponse(error_body(403, "admin is localhost only", "forbidden"), status_code=403)
        return JSONResponse(self.status())

    def _may_see(self, scope: Mapping[str, Any]) -> bool:
        """With auth on, who may call a path that is not proxied: anyone for /health and /ready,
        the admin endpoints' own localhost check for /admin/*, a caller on this host (the local
        dashboard, a local Prometheus) or a holder of a valid key for the rest."""
        path: str = scope["path"]
        if path in OPEN_PATHS or path.startswith(ADMIN_PREFIX):
            return True
        client = scope.get("client")
        if client is not None and client[0] in LOCAL_HOSTS:
            return True
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            self._authenticate(headers)
        except RequestError:
            return False
        return True

    async def _models(self, request: Request) -> Response:
        call = self._begin("/v1/models", request)
        try:
            self._authenticate(call.headers)
        except RequestError as exc:
            return self._refuse(call, exc)
        return await self._forward(call, "GET", None, streaming=False, release=None)

    def _passthrough(self, path: str, method: str) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            call = self._begin(path, request)
            try:
                self._authenticate(call.headers)
                body = None
                if method == "POST":
                    raw = await self._read_body(request, call.headers)
                    parse_json(raw)
                    body = raw
            except RequestError as exc:
                return self._refuse(call, exc)
            return await self._forward(call, method, body, streaming=False, release=None)

        return endpoint

    # -- the OpenAI endpoints -----------------------------------------------------------------

    def _endpoint(self, route: str) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            return await self._handle(route, request)

        endpoint.__name__ = route.strip("/").replace("/", "_")
        return endpoint

    async def _handle(self, route: str, request: Request) -> Response:
        call = self._begin(route, request)
        try:
            tenant = self._authenticate(call.headers)
            call.tenant = tenant.name
            raw = await self._read_body(request, call.headers)
            document = parse_json(raw)
            body = validate_body(
                route, document, model_name=self.spec.model.name, max_model_len=self.spec.model.max_model_len
            )
            slo_class = self._class_for(tenant, call.headers, document)
            call.cls = slo_class.name
            call.estimate = estimated_tokens(body, self.spec.model.max_model_len)
            self._charge(tenant, call.estimate)
            self._enter_tenant(call, tenant)
        except RequestError as exc:
            return self._refuse(call, exc)
        except ClientDisconnect:  # gone (or timed out, wire.py) while sending its body
            self._finish(call, CLIENT_GONE)
            return Response(status_code=CLIENT_GONE)
        streaming = document.get("stream") is True
        fields, cached = self._engine_fields(slo_class, tenant.name)
        encoded: bytes | None = cached
        usage: UsageRelay | None = None
        if streaming and route != "/v1/responses" and (tenant.name, "tokens") in self.buckets:
            # Settle a stream from the engine's own count: ask for its usage chunk, and take it
            # out again if the client did not ask for it.
            usage, fields = UsageRelay.for_request(document, fields)
            encoded = None
        elif streaming and (tenant.name, "tokens") in self.buckets:
            usage = UsageRelay(strip=False)  # the Responses API streams its usage always
        resume: StreamResume | None = None
        if streaming and self.resume_streams and resumable(route, document):
            # Keep the token ids relayed, so a replica that dies mid-stream can be resumed.
            resume, fields = StreamResume.for_request(route, document, fields, self.spec.model.max_model_len)
            encoded = None
        payload = with_fields(raw, document, fields, encoded)
        # A client that goes away while the gateway waits (queued, or for a non-streaming answer)
        # cancels this task: the upstream connection closes and the engine aborts the request.
        scope = request.scope
        scope[ON_DISCONNECT] = partial(self._client_gone, call, asyncio.current_task())
        try:
            try:
                await self.admission.acquire(slo_class.name)
            except ShedError as exc:
                self._refund(tenant.name, call.estimate)  # a shed request did not use its allowance
                return self._refuse(
                    call, RequestError(503, str(exc), "overloaded"), retry_after=exc.retry_after_s
                )
            # Gauges (queued, routable) are refreshed by the prober's tick, not on this hot path.
            return await self._forward(
                call,
                "POST",
                payload,
                streaming=streaming,
                release=self.admission.release,
                document=document,
                usage=usage,
                resume=resume,
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not call.client_gone or task is None:
                raise
            task.uncancel()
            self._finish(call, CLIENT_GONE)
            return Response(status_code=CLIENT_GONE)  # uvicorn drops it: the connection is gone
        finally:
            scope.pop(ON_DISCONNECT, None)

    def _client_gone(self, call: Call, task: asyncio.Task[Any] | None) -> None:
        call.client_gone = True
        if task is not None and not task.done():
            task.cancel()

    def _enter_tenant(self, call: Call, tenant: Tenant) -> None:
        """Count the request against the tenant's concurrency cap, or refuse it (429)."""
        cap = tenant.max_concurrent or self.spec.gateway.default_limits.max_concurrent
        if cap is None:
            return
        active = self.tenant_active.get(tenant.name, 0)
        if active >= cap:
            self._refund(tenant.name, call.estimate)
            raise RequestError(
                429, f"tenant over its limit of {cap} concurrent requests; retry later", "rate_limit_exceeded"
            )
        self.tenant_active[tenant.name] = active + 1
        call.holds_tenant_slot = True

    def _engine_fields(self, slo_class: SLOClass, tenant: str) -> tuple[dict[str, object], bytes]:
        """The fields the engine's scheduler reads, and their JSON: one of classes x tenants."""
        key = (slo_class.name, tenant)
        cached = self._fields_cache.get(key)
        if cached is None:
            fields = engine_fields(slo_class, tenant, self.spec.scheduler.policy)
            cached = self._fields_cache[key] = (fields, json.dumps(fields, separators=(",", ":")).encode())
        return cached

    def _class_for(self, tenant: Tenant, headers: Mapping[str, str], document: Mapping[str, Any]) -> SLOClass:
        priority = document.get("priority")
        try:
            return resolve_class(
                self.spec.scheduler,
                tenant,
                requested_name=headers.get(CLASS_HEADER),
                requested_priority=priority if isinstance(priority, int) else None,
            )
        except ClassError as exc:
            raise RequestError(400, str(exc)) from None

    def _authenticate(self, headers: Mapping[str, str]) -> Tenant:
        if self.keyring is None:
            return self.anonymous
        key = bearer_key(headers.get("authorization"), headers.get("x-api-key"))
        tenant = self.keyring.tenant_of(key) if key else None
        if tenant is None:
            raise RequestError(
                401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error"
            )
        return self.tenants[tenant]

    async def _read_body(self, request: Request, headers: Mapping[str, str]) -> bytes:
        limit = self.spec.gateway.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body over the {limit}-byte limit")
        # ASGI's receive directly: Starlette's request.stream() is an async generator around it.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body over the {limit}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _tenant_limits(self, tenant: Tenant) -> tuple[int | None, int | None]:
        defaults = self.spec.gateway.default_limits
        return (
            tenant.requests_per_minute or defaults.requests_per_minute,
            tenant.tokens_per_minute or defaults.tokens_per_minute,
        )

    def _charge(self, tenant: Tenant, tokens: int) -> None:
        """Take one request and the estimated tokens from the tenant's buckets, or 429."""
        rpm, tpm = self._tenant_limits(tenant)
        now = time.monotonic()
        takes: list[tuple[tuple[str, str], limits.Take]] = []
        for kind, per_minute, amount in (("requests", rpm, 1), ("tokens", tpm, tokens)):
            if per_minute is None:
                continue
            key = (tenant.name, kind)
            bucket = self.buckets.get(key) or limits.Bucket.full(per_minute, now)
            result = limits.take(bucket, amount, now)
            if not result.ok:
                raise _RateLimitedError(kind, per_minute, result.retry_after_s)
            takes.append((key, result))
        for key, result in takes:  # commit only when every bucket agreed
            self.buckets[key] = result.bucket

    def _refund(self, tenant_name: str, tokens: int) -> None:
        now = time.monotonic()
        for kind, amount in (("requests", 1), ("tokens", tokens)):
            key = (tenant_name, kind)
            if key in self.buckets:
                self.buckets[key] = limits.adjust(self.buckets[key], -amount, now)

    def _settle_tokens(self, call: Call, content: bytes) -> None:
        """Post-pay: correct the tokens bucket with the response's real usage."""
        if (call.tenant, "tokens") not in self.buckets:
            return
        try:
            usage = json.loads(content).get("usage") or {}
            actual = int(usage["total_tokens"])
        except (ValueError, TypeError, AttributeError, KeyError):
            return
        self._settle(call, actual)

    def _settle(self, call: Call, actual: int) -> None:
        key = (call.tenant, "tokens")
        if key in self.buckets:
            self.buckets[key] = limits.adjust(self.buckets[key], actual - call.estimate, time.monotonic())

    # -- forwarding ---------------------------------------------------------------------------

    def _upstream_headers(self, call: Call) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": call.headers.get("accept", "*/*")}
        request_id = call.headers.get("x-request-id")
        if request_id:
            headers["x-request-id"] = request_id[:128]
        # The engine's spans hang off this request's SERVER span: one trace per request.
        headers.update(self.tracing.context_headers(call.span))
        return headers

    def _route_key(self, call: Call, document: Mapping[str, Any] | None) -> routing.RouteKey:
        if self.routing.policy == "prefix_affinity" and document is not None:
            return routing.RouteKey(prefix=routing.prompt_prefix(document, self.routing.prefix_chars))
        if self.routing.policy == "session_affinity":
            return routing.RouteKey(session=call.headers.get(self.routing.session_header.lower()))
        return routing.RouteKey()

    def _pick(self, key: routing.RouteKey, exclude: list[str]) -> Replica | None:
        candidates = self.replicas.routable(exclude)
        if not candidates:
            return None
        if self.weights is not None:
            candidates = routing.by_revision_weight(candidates, self.weights, self.rng)
        view = routing.choose(
            self.routing.policy,
            [r.view() for r in candidates],
            key,
            counter=next(self.counter),
            rng=self.rng,
            load_factor=self.routing.bounded_load_factor,
        )
        return self.replicas.replicas[view.id]

    async def _forward(
        self,
        call: Call,
        method: str,
        body: bytes | None,
        *,
        streaming: bool,
        release: Callable[[], None] | None,
        document: Mapping[str, Any] | None = None,
        usage: UsageRelay | None = None,
        resume: StreamResume | None = None,
    ) -> Response:
        headers = self._upstream_headers(call)
        key = self._route_key(call, document)
        tried: list[str] = []
        last_error = "no ready replica"
        try:
            for attempt in range(1 + self.routing.retries):
                replica = self._pick(key, tried)
                if replica is None:
                    break
                tried.append(replica.id)
                if attempt:
                    self.metrics.retries.labels(call.route).inc()
                    call.span.set_attribute("tokenfleet.retries", attempt)
                outcome = await self._attempt(
                    call, replica, method, body, headers, streaming, release, usage, resume
                )
                if isinstance(outcome, Response):
                    release = None  # handed over to the response
                    return outcome
                last_error = outcome
        finally:
            if release is not None:
                release()
        if not tried:
            return self._refuse(
                call, RequestError(503, "no ready replica", "upstream_error"), retry_after=1.0
            )
        # The cause (replica, exception text) goes to the log, never to the client.
        rid = request_id(call)
        log.warning("request %s: all %d attempt(s) failed: %s", rid, len(tried), last_error)
        message = f"the model server failed to answer: all {len(tried)} attempt(s) failed (request id {rid})"
        return self._refuse(call, RequestError(502, message, "upstream_error"), retry_after=1.0)

    async def _attempt(
        self,
        call: Call,
        replica: Replica,
        method: str,
        body: bytes | None,
        headers: dict[str, str],
        streaming: bool,
        release: Callable[[], None] | None,
        usage: UsageRelay | None = None,
        resume: StreamResume | None = None,
    ) -> Response | str:
        """One try on one replica: a Response once committed to the client, else why it failed."""
        call.replica = replica.id
        self._enter(replica)
        upstream: UpstreamResponse | None = None
        try:
            upstream = await self.upstream.send(method, f"{replica.url}{call.route}", body, headers)
            if upstream.status >= 500:
                raise _UpstreamStatusError(upstream.status)
            first_byte_s = time.perf_counter() - call.started
            if streaming and upstream.status == 200:
                self._observe_first_byte(call, replica, first_byte_s)
                self.outcomes.record(replica.revision, True, first_byte_s)
                chunks = upstream.chunks()
                first = await anext(chunks, b"")
                rejection = scheduler_rejection(first)
                if rejection is not None:
                    return self._engine_rejected(call, replica, rejection, release)
                self.replicas.request_succeeded(replica)
                self.metrics.child(self.metrics.upstream_requests, replica.id, call.route, "ok").inc()
                headers = self._response_headers(call, replica, upstream.content_type or "text/event-stream")
                relay = self._relay(call, replica, upstream, first, chunks, release, usage, resume)
                upstream = None  # the relay owns it now
                return StreamingResponse(relay, status_code=200, media_type=None, headers=headers)
            content = await upstream.read()
        except (UpstreamError, _UpstreamStatusError) as exc:
            kind = exc.kind if isinstance(exc, UpstreamError) else "status_5xx"
            # UpstreamError's text starts with the cause's type name already.
            cause = exc if isinstance(exc, UpstreamError) else f"{type(exc).__name__} {exc}"
            reason = f"{replica.id}: {cause}"
            self.metrics.errors.labels(replica.id, call.route, kind).inc()
            self.metrics.upstream_requests.labels(replica.id, call.route, kind).inc()
            self.replicas.request_failed(replica, reason)
            self.outcomes.record(replica.revision, False, None)
            self._leave(replica)
            log.info("request attempt on %s failed: %s", replica.id, reason)
            # A failed attempt is an event on the request's span (the retry is the next attempt).
            call.span.add_event(
                "upstream attempt failed",
                {"tokenfleet.replica": replica.id, "error.type": kind, "exception.message": reason},
            )
            return reason
        except asyncio.CancelledError:  # the client went away (_client_gone): not the replica's fault
            self._leave(replica)
            raise
        finally:
            if upstream is not None:
                upstream.close()
        ok = 200 <= upstream.status < 300
        rejection = scheduler_rejection(content) if ok else None
        if rejection is not None:
            self._observe_first_byte(call, replica, first_byte_s)
            return self._engine_rejected(call, replica, rejection, release)
        # Replica and admission accounting, token settlement, metrics and the span's end run
        # once the answer is on the wire: the client does not wait for them. They are queued
        # right behind the write, ahead of any request that arrives after, so the next request
        # still sees them done.
        status = upstream.status
        return Answer(
            content,
            status,
            self._raw_response_headers(call, replica, upstream.content_type),
            after=lambda: self._answered(
                call, replica, status, content if ok else None, first_byte_s, release
            ),
        )

    def _answered(
        self,
        call: Call,
        replica: Replica,
        status: int,
        content: bytes | None,
        first_byte_s: float,
        release: Callable[[], None] | None,
    ) -> None:
        self._leave(replica)
        self.replicas.request_succeeded(replica)
        self.metrics.child(self.metrics.upstream_requests, replica.id, call.route, "ok").inc()
        self._observe_first_byte(call, replica, first_byte_s)
        self.outcomes.record(replica.revision, True, first_byte_s)
        if release is not None:
            release()
        if content is not None:
            self._settle_tokens(call, content)
        self._finish(call, status)

    def _observe_first_byte(self, call: Call, replica: Replica, seconds: float) -> None:
        self.metrics.child(self.metrics.first_byte, call.route, call.cls, replica.id).observe(seconds)

    def _engine_rejected(
        self, call: Call, replica: Replica, reason: str, release: Callable[[], None] | None
    ) -> Response:
        """The engine's scheduler refused the request (its class queue is full): 503, retry later.

        The replica is healthy (it answered), so this is not a failure for the circuit breaker,
        and it is not retried elsewhere: every replica runs the same admission limits.
        """
        self._leave(replica)
        self.replicas.request_succeeded(replica)
        self.metrics.upstream_requests.labels(replica.id, call.route, "ok").inc()
        if release is not None:
            release()
        self._refund(call.tenant, call.estimate)  # refused work used none of the allowance
        message = f"engine scheduler rejected the request: {reason}"
        return self._refuse(call, RequestError(503, message, "overloaded"), retry_after=1.0)

    def _raw_response_headers(
        self, call: Call, replica: Replica, content_type: str | None
    ) -> list[tuple[bytes, bytes]]:
        """`_response_headers` as ASGI's byte pairs (what `Answer` sends as they are)."""
        headers = self._response_headers(call, replica, content_type)
        return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]

    def _response_headers(self, call: Call, replica: Replica, content_type: str | None) -> dict[str, str]:
        headers = {REPLICA_HEADER: replica.id}
        if call.cls != "none":
            headers[CLASS_HEADER] = call.cls
        if content_type:
            headers["content-type"] = content_type
        return headers

    async def _relay(
        self,
        call: Call,
        replica: Replica,
        upstream: UpstreamResponse,
        first: bytes,
        chunks: AsyncIterator[bytes],
        release: Callable[[], None] | None,
        usage: UsageRelay | None = None,
        resume: StreamResume | None = None,
    ) -> AsyncIterator[bytes]:
        """Pass the engine's SSE bytes through (less a usage chunk the client did not ask for,
        see `UsageRelay`). A break is resumed on another replica when `resume` allows (see
        `resume.py`), else it becomes an SSE error event."""
        tail = first[-2:]
        status = 200
        resumes_left = self.routing.retries
        tried = [replica.id]
        current: tuple[Replica, UpstreamResponse] | None = (replica, upstream)
        pending = first
        try:
            while current is not None:
                try:
                    if pending:
                        out = _shaped(pending, usage, resume)
                        if out:
                            tail = (tail + out)[-2:]
                            yield out
                    async for chunk in chunks:
                        # Tokens are flowing: the replica is alive whatever its probes say.
                        current[0].last_success = time.monotonic()
                        out = _shaped(chunk, usage, resume)
                        if out:
                            tail = (tail + out)[-2:]
                            yield out
                    if usage is not None and usage.held:
                        yield usage.flush()
                    break
                except UpstreamError as exc:
                    broken, broken_upstream = current
                    current = None
                    self._stream_broke(call, broken, exc)
                    broken_upstream.close()
                    self._leave(broken)
                    if resume is not None and resume.finished:
                        yield b"data: [DONE]\n\n"  # only the stream's end was lost
                        break
                    if resume is not None and resumes_left > 0 and resume.remaining() > 0:
                        resumes_left -= 1
                        resume.broken()
                        opened = await self._continue_stream(call, resume, tried)
                        if opened is not None:
                            current = (opened[0], opened[1])
                            chunks, pending = opened[2], opened[3]
                            continue
                    status = 502
                    rid = request_id(call)
                    held = usage.flush() if usage is not None else b""
                    tail = (tail + held)[-2:]
                    prefix = b"" if tail in (b"", b"\n\n") else b"\n\n"  # never glue onto a partial event
                    message = f"the model server failed mid-stream; not retried (request id {rid})"
                    yield held + prefix + sse_error(message)
        finally:
            if current is not None:
                # Closing the upstream aborts the engine's request (frees its KV cache) even when
                # the client went away and this generator is being cancelled: a plain call, no
                # await that the cancellation could interrupt.
                live, live_upstream = current
                if status == 200:
                    live.last_success = time.monotonic()  # alive: see breaker's `busy`
                live_upstream.close()
                self._leave(live)
            if usage is not None and usage.total_tokens is not None:
                self._settle(call, usage.total_tokens)
            if release is not None:
                release()
            # A client that disconnected surfaces here as GeneratorExit: still one finished call.
            self._finish(call, status)

    def _stream_broke(self, call: Call, replica: Replica, exc: UpstreamError) -> None:
        self.metrics.errors.labels(replica.id, call.route, "mid_stream").inc()
        self.replicas.request_failed(replica, f"{replica.id}: stream broke: {exc.cause_name}")
        self.outcomes.record(replica.revision, False, None)
        log.warning("request %s: %s broke mid-stream: %s", request_id(call), replica.id, exc)

    async def _continue_stream(
        self, call: Call, resume: StreamResume, tried: list[str]
    ) -> tuple[Replica, UpstreamResponse, AsyncIterator[bytes], bytes] | None:
        """Open the continuation of a broken stream on a replica not tried yet, up to its first
        chunk; None when no replica could take it."""
        body = resume.continuation(self.spec.model.name)
        headers = self._upstream_headers(call)
        key = self._route_key(call, resume.document)
        while (replica := self._pick(key, tried)) is not None:
            tried.append(replica.id)
            self._enter(replica)
            upstream: UpstreamResponse | None = None
            try:
                upstream = await self.upstream.send("POST", f"{replica.url}/v1/completions", body, headers)
                if upstream.status != 200:
                    raise _UpstreamStatusError(upstream.status)
                chunks = upstream.chunks()
                first = await anext(chunks, b"")
            except (UpstreamError, _UpstreamStatusError) as exc:
                if upstream is not None:
                    upstream.close()
                self._leave(replica)
                if isinstance(exc, _UpstreamStatusError) and exc.status < 500:
                    log.warning("request %s: continuation refused: %s", request_id(call), exc)
                    return None  # every replica would refuse it alike
                self.replicas.request_failed(replica, f"{replica.id}: {exc}")
                continue
            self.metrics.retries.labels(call.route).inc()
            call.span.set_attribute("tokenfleet.resumed", len(tried) - 1)
            call.replica = replica.id
            return replica, upstream, chunks, first
        return None

    def _enter(self, replica: Replica) -> None:
        replica.in_flight += 1
        replica.requests += 1

    def _leave(self, replica: Replica) -> None:
        replica.in_flight = max(0, replica.in_flight - 1)

    # -- bookkeeping --------------------------------------------------------------------------

    def _begin(self, route: str, request: Request) -> Call:
        # A plain dict rather than Starlette's Headers: each of its lookups scans and decodes the
        # whole list, and a request looks up six or seven names.
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in request.scope["headers"]
        }
        # Attributes are set once, at the end (_finish): each set costs a lock and a validation.
        span = self.tracing.tracer.start_span(
            f"{request.method} {route}", context=self.tracing.extract(headers), kind=SpanKind.SERVER
        )
        return Call(route=route, span=span, headers=headers, method=request.method)

    def _refuse(self, call: Call, exc: RequestError, retry_after: float | None = None) -> JSONResponse:
        headers: dict[str, str] = {}
        if isinstance(exc, _RateLimitedError):
            retry_after = exc.retry_after_s
        if retry_after is not None and exc.status in (429, 503):
            headers["retry-after"] = str(max(1, math.ceil(retry_after)))
        reason = {401: "auth", 429: "rate_limit", 502: "upstream", 503: "unavailable"}.get(
            exc.status, "invalid"
        )
        self.metrics.rejected.labels(reason, call.cls, call.tenant).inc()
        self._finish(call, exc.status)
        return JSONResponse(
            error_body(exc.status, exc.message, exc.kind), status_code=exc.status, headers=headers
        )

    def _finish(self, call: Call, status: int) -> None:
        if call.done:
            return
        call.done = True
        if call.holds_tenant_slot:
            self.tenant_active[call.tenant] -= 1
        metrics = self.metrics
        metrics.child(metrics.requests, call.route, call.cls, call.tenant, code_class(status)).inc()
        metrics.child(metrics.latency, call.route, call.cls).observe(time.perf_counter() - call.started)
        attributes: dict[str, str | int] = {
            "http.request.method": call.method,
            "http.route": call.route,
            "http.response.status_code": status,
            "tokenfleet.class": call.cls,
            "tokenfleet.tenant": call.tenant,
        }
        if call.replica is not None:
            attributes["tokenfleet.replica"] = call.replica
        call.span.set_attributes(attributes)
        if status >= 500:
            call.span.set_status(StatusCode.ERROR)
        call.span.end()


REJECTED_PREFIX = "tokenfleet:rejected"


def _shaped(chunk: bytes, usage: UsageRelay | None, resume: StreamResume | None) -> bytes:
    """An upstream chunk as the client gets it: resumable streams rewritten first (whole events,
    token ids it did not ask for removed), then a usage chunk it did not ask for taken out."""
    if resume is not None:
        chunk = resume.feed(chunk)
    if usage is not None:
        chunk = usage.feed(chunk)
    return chunk


def scheduler_rejection(content: bytes) -> str | None:
    """The SLA scheduler's admission rejection carried in an engine's 200 answer, if any.

    vLLM cannot turn a scheduler decision into an HTTP error, so the scheduler finishes the
    request at once with finish_reason `abort` and a stop_reason starting `tokenfleet:rejected`
    (engine/sla_scheduler.py). `content` is a JSON body or the first bytes of an SSE stream.
    """
    if REJECTED_PREFIX.encode() not in content:
        return None  # the common case costs one substring search
    documents: list[Any] = []
    text = content.decode(errors="replace")
    for line in [text, *text.splitlines()]:
        payload = line.removeprefix("data: ").strip()
        with contextlib.suppress(ValueError):
            documents.append(json.loads(payload))
    for document in documents:
        choices = document.get("choices") if isinstance(document, dict) else None
        for choice in choices or []:
            reason = choice.get("stop_reason") if isinstance(choice, dict) else None
            if choice.get("finish_reason") == "abort" and str(reason).startswith(REJECTED_PREFIX):
                return str(reason).removeprefix(REJECTED_PREFIX).lstrip(": ") or "class queue full"
    return None


class _UpstreamStatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"status {status}")
        self.status = status


class _RateLimitedError(RequestError):
    def __init__(self, kind: str, per_minute: int, retry_after_s: float) -> None:
        super().__init__(
            429, f"tenant over its {kind}/min limit ({per_minute}); retry later", "rate_limit_exceeded"
        )
        self.retry_after_s = retry_after_s


def create_app(
    service: LLMService,
    replicas: Iterable[tuple[str, str]] = (),
    discovery: DiscoveryConfig | None = None,
    api: ApiAccess | None = None,
) -> FastAPI:
    """The gateway app: fixed `replicas`, or (with `discovery`) the ones the Kubernetes API shows."""
    gateway = Gateway(service, discovery=discovery, api=api)
    gateway.set_replicas(replicas)
    app = gateway.app
    app.state.gateway = gateway
    return app
