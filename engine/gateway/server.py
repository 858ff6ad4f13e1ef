"""Run an ASGI app on uvicorn in a background thread (tests, benchmarks, embedding)."""

from __future__ import annotations

import gc
import threading
import time
from typing import Final

import httpx
import uvicorn
from fastapi import FastAPI

from tokenfleet.engine.gateway.wire import ClientLimits, GatewayHttpProtocol

# uvloop and httptools (C) rather than asyncio's pure-Python loop internals and h11: the
# gateway's added latency is mostly its CPU per request (docs/results/gateway.md). HTTP is
# uvicorn's httptools protocol, sending each answer in one write (wire.py).
LOOP: Final = "uvloop"
HTTP: Final = GatewayHttpProtocol
# Connections (and requests in progress) at once; past it uvicorn answers 503 to new requests.
# Each costs a few KB of gateway memory; a stream holds one for its whole length.
MAX_CONNECTIONS: Final = 4096
# Idle keep-alive connections close after this (uvicorn's default, stated: it bounds idle sockets).
KEEPALIVE_S: Final = 5


def gateway_config(
    app: FastAPI,
    host: str,
    port: int,
    *,
    drain_s: int,
    loop: str = LOOP,
    limits: ClientLimits | None = None,
    max_connections: int = MAX_CONNECTIONS,
) -> uvicorn.Config:
    """uvicorn as the gateway runs it, wherever it runs (its own process, a thread, `up`).

    No proxy-headers middleware: the gateway is the edge, so it must not take a client address
    from X-Forwarded-For (the admin endpoint trusts localhost), and it is a layer per request.
    Slow or oversized clients are bounded: header and body read timeouts and a header size cap
    (`ClientLimits`, 408/431), a connection cap (503), idle keep-alive closed after 5 s.
    """
    http: type[GatewayHttpProtocol] = HTTP
    if limits is not None and limits != GatewayHttpProtocol.limits:
        http = type("GatewayHttpProtocol", (GatewayHttpProtocol,), {"limits": limits})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=drain_s,
        lifespan="on",
        loop=loop,
        http=http,
        limit_concurrency=max_connections,
        timeout_keep_alive=KEEPALIVE_S,
    )


def freeze_startup_heap() -> None:
    """Keep what imports and app construction allocated out of the cyclic GC's scans.

    Those ~75k objects live as long as the process, yet every full collection walked them: ~0.1 s
    on these vCPUs, a pause for every request in flight each time. Call once, before serving.
    """
    gc.collect()  # cyclic garbage frozen now would never be freed
    gc.freeze()


class ServerThread:
    def __init__(
        self,
        app: FastAPI,
        port: int,
        host: str = "127.0.0.1",
        *,
        limits: ClientLimits | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.port = port
        self.host = host
        self.server = uvicorn.Server(
            gateway_config(app, host, port, drain_s=5, limits=limits, max_connections=max_connections)
        )
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def wait_until(self, path: str, status: int = 200, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}{path}", timeout=1.0).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.url}{path} never answered {status}")
