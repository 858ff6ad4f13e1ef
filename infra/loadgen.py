"""`LoadGenerators`: Locust (master + workers) running load/'s locustfile against one gateway.

The locustfile is the one `tokenfleet bench run` uses; it reads the same bench-config JSON, here
from a ConfigMap. The web UI is a ClusterIP Service only: reach it with `kubectl port-forward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from tokenfleet.infra import manifests
from tokenfleet.infra.kube import apply
from tokenfleet.infra.stackconfig import WORKLOADS_DIR
from tokenfleet.infra.stackconfig import LoadGenerators as LoadConfig
from tokenfleet.load.workload import load_workload
from tokenfleet.spec import LLMService

IMAGE_ROOT = "/app"  # where images/load.Dockerfile puts the repository


def bench_config(cfg: LoadConfig, service: LLMService, target: str) -> dict[str, Any]:
    """The JSON the locustfile reads (load/bench.py writes the same keys for local runs)."""
    workload = load_workload(WORKLOADS_DIR / f"{cfg.workload}.yaml").model_dump(mode="json", by_alias=True)
    prompts = workload.get("prompts", {})
    # load_workload makes data paths absolute on this machine; in the image they live under /app.
    repo = str(WORKLOADS_DIR.parent.parent)
    if isinstance(prompts.get("path"), str) and prompts["path"].startswith(repo):
        prompts["path"] = IMAGE_ROOT + prompts["path"][len(repo) :]
    return {
        "workload": workload,
        "target": target,
        "model": service.spec.model.name,
        "duration_s": cfg.duration_s,
        "raw_dir": "/tmp/raw",
        "workers": cfg.workers,
    }


@dataclass(frozen=True, slots=True)
class LoadGeneratorsArgs:
    provider: k8s.Provider
    config: LoadConfig
    image: str
    service: LLMService  # the target, completed
    target: str  # its gateway URL
    namespace: pulumi.Resource


class LoadGenerators(pulumi.ComponentResource):
    ui_url: str

    def __init__(
        self, name: str, args: LoadGeneratorsArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("tokenfleet:infra:LoadGenerators", name, None, opts)
        cfg = args.config
        ns = cfg.namespace
        child = pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=[args.namespace])
        config = manifests.locust_configmap(ns, bench_config(cfg, args.service, args.target))
        configmap = apply(config, child)
        after = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[configmap]))
        apply(manifests.locust_service(ns), child)
        stop_timeout = min(args.service.spec.routing.first_byte_timeout_s, 120.0)
        apply(manifests.locust_master(ns, args.image, args.target, cfg.workers, stop_timeout), after)
        apply(manifests.locust_workers(ns, args.image, cfg.workers), after)
        apply(
            manifests.load_policy(
                ns,
                args.service.metadata.namespace,
                args.service.spec.gateway.port,
                manifests.LOCUST_MASTER_PORT,
                manifests.LOCUST_UI_PORT,
            ),
            child,
        )
        self.ui_url = f"http://locust-master.{ns}.svc.cluster.local:{manifests.LOCUST_UI_PORT}"
        self.register_outputs({"uiUrl": self.ui_url})
