"""The gateway's routes: the FastAPI app, its handlers, and the replica set's membership.

Order of work per request, cheapest refusal first: auth (401, nothing read) → body size (413) →
JSON and field validation (400/404) → class → tenant rate limits (429) → admission (503) →
route → forward. Only the last two touch an engine; they are `forward.Forwarder`'s. The tenant
ledger is `ledger.py`; the dashboard is only mounted here (observability/dashboard.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from tokenfleet.engine.gateway.admission import AdmissionQueue, ShedError
from tokenfleet.engine.gateway.calls import Call, error_body
from tokenfleet.engine.gateway.discovery import ApiAccess, Discovery, DiscoveryConfig, EngineEndpoint, plan
from tokenfleet.engine.gateway.fastpath import Endpoint, FastRoutedApp
from tokenfleet.engine.gateway.forward import Forwarder
from tokenfleet.engine.gateway.ledger import RateLimitedError, TenantLedger
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
from tokenfleet.engine.gateway.upstream import Upstream
from tokenfleet.engine.gateway.usage import UsageRelay
from tokenfleet.engine.gateway.validation import (
    RequestError,
    estimated_tokens,
    openapi_components,
    parse_json,
    validate_body,
)
from tokenfleet.engine.gateway.wire import ON_DISCONNECT
from tokenfleet.engine.sla_contract import CLASS_HEADER, ClassError
from tokenfleet.observability.dashboard import LocalMonitor, mount_dashboard
from tokenfleet.observability.otlp_endpoint import trace_service_name
from tokenfleet.spec import LLMService, SLOClass, Tenant

LOCAL_HOSTS = frozenset({"127.0.0.1", "::1", "localhost", "testclient"})
OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
# With auth on, every other path needs a key unless the caller is on this host (operational
# endpoints: /metrics, /dashboard, /openapi.json, /docs expose tenants, traces and alerts).
OPEN_PATHS = frozenset({"/health", "/ready"})
ADMIN_PREFIX = "/admin/"  # localhost-only by their own check: the fleet's CLI calls them keyless
CLIENT_GONE = 499  # nginx's "client closed request": recorded, never sent

log = logging.getLogger(__name__)


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
        self.tracing = Tracing(trace_service_name("gateway", service.metadata.name), env)
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
        # The longest context any serving revision takes (the local fleet widens it while a
        # rollout runs both): a request only one revision can serve is that revision's to refuse,
        # so the refusal counts against it and not against every client.
        self.context_limit = spec.model.max_model_len
        self.outcomes = Outcomes(listener=self.metrics.count_outcome)
        self.ledger = TenantLedger(spec.gateway.default_limits)
        # Resume streams broken by a dead replica on another one (resume.py).
        self.resume_streams = self.routing.resume_streams
        self._fields_cache: dict[tuple[str, str], tuple[dict[str, object], bytes]] = {}
        # One pooled client for all upstream traffic (requests and probes), started with the app.
        self.upstream = Upstream(
            connect_timeout_s=self.routing.connect_timeout_s, read_timeout_s=self.routing.first_byte_timeout_s
        )
        self.forwarder = Forwarder(
            routing=self.routing,
            model_name=spec.model.name,
            replicas=self.replicas,
            upstream=self.upstream,
            metrics=self.metrics,
            outcomes=self.outcomes,
            tracing=self.tracing,
            ledger=self.ledger,
            refuse=self._refuse,
            finish=self._finish,
        )
        self._prober: asyncio.Task[None] | None = None
        # On a cluster: replicas and weights from the Kubernetes API instead of `set_replicas`.
        self.discovery = discovery
        self._api = api
        self._discoverer: asyncio.Task[None] | None = None
        # Whoever runs the replicas (the local fleet) adds its view to /admin/status.
        self.extra_status: Callable[[], dict[str, object]] | None = None
        # Replicas that left the membership with requests in flight (see `set_replicas`).
        self._leaving: dict[str, Replica] = {}
        self.app = self._build_app()

    # -- membership and state ---------------------------------------------------------------

    def set_replicas(
        self, members: Iterable[tuple[str, str]], revisions: Mapping[str, str] | None = None
    ) -> None:
        """The membership, whoever decides it (the local fleet calls this, discovery through
        `apply_endpoints`). A replica that left takes its series with it; one still finishing
        requests (a drain) recreates a few as they end, so it is forgotten again once it has none
        left (`_refresh_slots`)."""
        before = dict(self.replicas.replicas)
        self.replicas.set(members, revisions)
        for rid, replica in before.items():
            if rid not in self.replicas.replicas:
                self.metrics.forget_replica(rid)
                if replica.in_flight:
                    self._leaving[rid] = replica
        self._refresh_slots()

    def set_weights(self, weights: Mapping[str, int] | None) -> None:
        self.forwarder.weights = dict(weights) if weights else None

    @property
    def weights(self) -> dict[str, int] | None:
        """Traffic percent per revision during a canary (set by the control loop); None: all replicas."""
        return self.forwarder.weights

    def apply_endpoints(self, endpoints: list[EngineEndpoint]) -> None:
        """Discovered ready engine pods become the replica set; pods that left get no new requests
        and finish the ones they hold (the Replica object lives on in those requests)."""
        current = {rid: (r.url, r.revision) for rid, r in self.replicas.replicas.items()}
        change = plan(current, endpoints)
        if change.changed:
            log.info("replicas: +%s -%s", list(change.added), list(change.removed))
            self.set_replicas(change.members, change.revisions)

    def _refresh_slots(self) -> None:
        self.admission.set_slots(len(self.replicas.routable()) * self.per_replica_slots)
        for replica in self.replicas.replicas.values():
            self.metrics.init_replica(replica.id)
            self.metrics.replica_up.labels(replica.id).set(1 if replica.breaker.admits else 0)
            # Read at scrape time: nothing to update per request.
            self.metrics.in_flight.labels(replica.id).set_function(partial(self._in_flight_of, replica.id))
        for cls, n in self.admission.queued().items():
            self.metrics.queued.labels(cls).set(n)
        for rid, replica in list(self._leaving.items()):
            if rid in self.replicas.replicas or not replica.in_flight:
                del self._leaving[rid]
                if rid not in self.replicas.replicas:  # (back under its id: its series are live)
                    self.metrics.forget_replica(rid)

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
        self.metrics.init_routes(proxied)
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
        return await self.forwarder.forward(call, "GET", None, streaming=False, release=None)

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
            return await self.forwarder.forward(call, method, body, streaming=False, release=None)

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
                route, document, model_name=self.spec.model.name, max_model_len=self.context_limit
            )
            slo_class = self._class_for(tenant, call.headers, document)
            call.cls = slo_class.name
            call.estimate = estimated_tokens(body, self.context_limit)
            self.ledger.charge(tenant, call.estimate)
            self.ledger.enter(call, tenant)
        except RequestError as exc:
            return self._refuse(call, exc)
        except ClientDisconnect:  # gone (or timed out, wire.py) while sending its body
            self._finish(call, CLIENT_GONE)
            return Response(status_code=CLIENT_GONE)
        streaming = document.get("stream") is True
        fields, cached = self._engine_fields(slo_class, tenant.name)
        encoded: bytes | None = cached
        usage: UsageRelay | None = None
        if streaming and route != "/v1/responses" and (tenant.name, "tokens") in self.ledger.buckets:
            # Settle a stream from the engine's own count: ask for its usage chunk, and take it
            # out again if the client did not ask for it.
            usage, fields = UsageRelay.for_request(document, fields)
            encoded = None
        elif streaming and (tenant.name, "tokens") in self.ledger.buckets:
            usage = UsageRelay(strip=False)  # the Responses API streams its usage always
        resume: StreamResume | None = None
        if streaming and self.resume_streams and resumable(route, document):
            # Keep the token ids relayed, so a replica that dies mid-stream can be resumed.
            resume, fields = StreamResume.for_request(route, document, fields, self.context_limit)
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
                self.ledger.refund(tenant.name, call.estimate)  # a shed request did not use its allowance
                return self._refuse(
                    call, RequestError(503, str(exc), "overloaded"), retry_after=exc.retry_after_s
                )
            # Gauges (queued, routable) are refreshed by the prober's tick, not on this hot path.
            return await self.forwarder.forward(
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
        if isinstance(exc, RateLimitedError):
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
        self.ledger.leave(call)
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
