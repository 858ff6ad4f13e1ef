"""A minimal async Kubernetes client for the operator's own calls (get, apply, delete).

It authenticates with the same `kopf.ConnectionInfo` kopf's login produced, so the operator
has one identity. Writes are server-side apply: PATCH with `application/apply-patch+yaml`, a
fixed `fieldManager` and `force=true` (the operator owns these objects' fields).
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import kopf

from tokenfleet.operator.crd import PLURAL
from tokenfleet.spec import API_VERSION

FIELD_MANAGER = "tokenfleet-operator"

# kind → (api prefix, plural) for every kind the operator writes or reads.
KINDS: dict[str, tuple[str, str]] = {
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Pod": ("/api/v1", "pods"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "ServiceMonitor": ("/apis/monitoring.coreos.com/v1", "servicemonitors"),
    "LLMService": (f"/apis/{API_VERSION}", PLURAL),
}


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def object_path(kind: str, namespace: str, name: str | None = None) -> str:
    prefix, plural = KINDS[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


class Kube:
    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self._info = info
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Built lazily: a ClientSession belongs to the running loop.
            ssl = self._info.as_ssl_context() if self._info.server.startswith("https") else False
            self._session = aiohttp.ClientSession(
                base_url=self._info.server,
                headers=self._info.as_http_headers(),
                connector=aiohttp.TCPConnector(ssl=ssl),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        async with self._client().get(object_path(kind, namespace, name)) as resp:
            if resp.status == 404:
                return None
            await _raise_for(resp)
            body: dict[str, Any] = await resp.json()
            return body

    async def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        async with self._client().get(
            object_path(kind, namespace), params={"labelSelector": selector}
        ) as resp:
            await _raise_for(resp)
            body: dict[str, Any] = await resp.json()
            items: list[dict[str, Any]] = body.get("items") or []
            return items

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply; JSON is YAML, so the body is sent as JSON text."""
        meta = obj["metadata"]
        path = object_path(obj["kind"], meta["namespace"], meta["name"])
        async with self._client().patch(
            path,
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            data=json.dumps(obj),
            headers={"Content-Type": "application/apply-patch+yaml"},
        ) as resp:
            await _raise_for(resp)
            body: dict[str, Any] = await resp.json()
            return body

    async def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource (lists such as conditions are replaced whole)."""
        async with self._client().patch(
            object_path(kind, namespace, name) + "/status",
            data=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        ) as resp:
            await _raise_for(resp)

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete (foreground: the Deployment's pods go first); False when it was already gone."""
        async with self._client().delete(
            object_path(kind, namespace, name), json={"propagationPolicy": "Foreground"}
        ) as resp:
            if resp.status == 404:
                return False
            await _raise_for(resp)
            return True


async def _raise_for(resp: aiohttp.ClientResponse) -> None:
    if resp.status >= 400:
        text = await resp.text()
        raise KubeError(resp.status, text[:500])
