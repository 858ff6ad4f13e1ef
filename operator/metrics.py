"""The default metrics source on a cluster: each service's gateway `/metrics`, scraped directly.

Only what the gateway can tell for the whole service is read (requests waiting in its queues,
and in flight to the engines). It cannot split outcomes by revision — on a cluster it fronts the
engine Service, one upstream for both tracks — so canary analysis has no per-revision stats
from this source, and a canary waits at its first step (see ADR 0007).
"""

from __future__ import annotations

import logging

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tokenfleet.operator.control import Signals
from tokenfleet.operator.loop import Metrics
from tokenfleet.operator.model import Conventions
from tokenfleet.spec import LLMService

logger = logging.getLogger(__name__)


def signals_from_text(text: str) -> Signals:
    """Service-level signals from one gateway exposition (pure; tested on fixed text)."""
    queued = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "tokenfleet_gateway_queued":
            queued += sum(sample.value for sample in family.samples)
    return Signals(gateway_queued=int(queued))


class GatewayScraper:
    """A `MetricsSource` that reads `http://<service>.<namespace>.svc:<port>/metrics`."""

    def __init__(self, conventions: Conventions, timeout_s: float = 3.0) -> None:
        self._conventions = conventions
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def __call__(self, service: LLMService) -> Metrics | None:
        meta = service.metadata
        host = f"{meta.name}.{meta.namespace}.svc.{self._conventions.cluster_domain}"
        url = f"http://{host}:{service.spec.gateway.port}/metrics"
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.get(url) as resp,
            ):
                if resp.status != 200:
                    return None
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # No metrics this tick: the autoscaler holds rather than guessing.
            logger.info("metrics of %s/%s unavailable: %s", meta.namespace, meta.name, exc)
            return None
        return Metrics(signals=signals_from_text(text))
