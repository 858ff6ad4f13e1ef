"""Kernel receive timestamps (SO_TIMESTAMPNS) for the harness's HTTP connections.

A CPU-starved load generator reads a socket late, and a timestamp taken when it reads includes
that wait. Linux stamps every TCP segment when it arrives; `recvmsg` hands that stamp back with the
data. This module gives httpx a connection backend that reads with `recvmsg` and keeps the stamp
of the latest read per thread (per greenlet under Locust's gevent), so the timing code can use the
time the bytes reached this host instead of the time this process got around to them.

It plugs into httpcore's public `network_backend` hook; only the swap of httpx's pool touches a
private attribute, and where anything is unsupported (TLS, another OS) reads fall back to plain
`recv` and `last_receive()` stays None, so callers keep their own clock.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import httpcore
import httpx
from httpcore._backends.sync import SyncBackend, SyncStream  # the default backend we extend

SO_TIMESTAMPNS: int = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("qq")
_local = threading.local()


def last_receive() -> float | None:
    """Unix time at which the kernel received the data of this thread's latest read."""
    value: float | None = getattr(_local, "t", None)
    return value


def reset() -> None:
    _local.t = None


def parse_timestamp(ancdata: list[tuple[int, int, bytes]]) -> float | None:
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack(payload[: _TIMESPEC.size])
            return float(sec) + float(nsec) / 1e9
    return None


class _StampedStream(SyncStream):
    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._sock.settimeout(timeout)
            data, ancdata, _, _ = self._sock.recvmsg(max_bytes, socket.CMSG_SPACE(_TIMESPEC.size))
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(exc) from exc
        except OSError as exc:
            raise httpcore.ReadError(exc) from exc
        stamp = parse_timestamp(ancdata)
        if stamp is not None:
            _local.t = stamp
        return data


class StampingBackend(SyncBackend):
    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
        sock = stream.get_extra_info("socket")
        if not isinstance(sock, socket.socket) and not hasattr(sock, "recvmsg"):
            return stream
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:
            return stream
        return _StampedStream(sock)


def stamping_client(timeout: float, *, max_connections: int | None = None) -> httpx.Client:
    """An httpx.Client whose plain-HTTP reads record kernel receive times."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    transport = httpx.HTTPTransport(limits=limits)
    if isinstance(getattr(transport, "_pool", None), httpcore.ConnectionPool):
        transport._pool = httpcore.ConnectionPool(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=StampingBackend(),
        )
    return httpx.Client(transport=transport, timeout=timeout)
