"""`LLMServices`: the stack's LLMService objects, and the Secrets they name (never their values).

Each service is the `tokenfleet.spec` model the stack config was validated with, completed for
this cluster before it is written: an engine image the spec leaves at its default becomes the
stack's pinned tokenfleet engine image for its device, and a GPU service that names no pools gets
every stack GPU pool large enough for one replica (node selector + the GPU taint's toleration).
API keys and the Hugging Face token are Secrets created from Pulumi secret config; the CR only
carries the Secret's name.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
import yaml

from tokenfleet.infra import manifests
from tokenfleet.infra.cluster import GPU_TAINT_KEY, POOL_LABEL
from tokenfleet.infra.kube import apply
from tokenfleet.infra.stackconfig import GpuPool, Images, SecretRef
from tokenfleet.spec import API_VERSION, KIND, LLMService

KEYS_FILE = "keys.yaml"  # the entry the gateway reads from apiKeysSecret (operator/workloads.py)


def complete_service(service: LLMService, namespace: str, images: Images, pools: list[GpuPool]) -> LLMService:
    """The service as it is applied: namespace, image and GPU pools filled from the stack."""
    engine = service.spec.engine
    document = service.model_dump(mode="json", by_alias=True, exclude_unset=True)
    engine_doc = document.setdefault("spec", {}).setdefault("engine", {})
    if "image" not in engine.model_fields_set:
        # The stock vLLM image lacks tokenfleet's scheduler and kernels: use the stack's own.
        engine_doc["image"] = images.engine_gpu if engine.device == "gpu" else images.engine_cpu
    if engine.device == "gpu" and not engine.gpu_pools:
        engine_doc["gpuPools"] = [
            {
                "name": p.name,
                "nodeSelector": {POOL_LABEL: p.name},
                "tolerations": [{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
            }
            for p in pools
            if p.gpus_per_node >= engine.gpus_per_replica
        ]
    document["metadata"]["namespace"] = namespace
    # Re-validated: the completed object must still be a valid LLMService.
    return LLMService.model_validate(document)


def custom_resource(service: LLMService) -> dict[str, Any]:
    """The CR as written: only what the user set (plus completions), defaults left to the CRD."""
    document = service.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return {"apiVersion": API_VERSION, "kind": KIND, **document}


@dataclass(frozen=True, slots=True)
class LLMServicesArgs:
    provider: k8s.Provider
    services: list[LLMService]  # completed (complete_service)
    service_namespaces: list[str]  # every namespace the operator serves (the HF token goes to each)
    crd: pulumi.Resource
    operator: pulumi.Resource
    namespaces: dict[str, pulumi.Resource]
    api_keys: pulumi.Output[dict[str, Any]] | None
    hf_token: pulumi.Output[str] | None
    hf_token_secret: SecretRef | None


class LLMServices(pulumi.ComponentResource):
    objects: dict[str, pulumi.CustomResource]
    endpoints: dict[str, str]

    def __init__(self, name: str, args: LLMServicesArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tokenfleet:infra:LLMServices", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=args.provider)
        self.objects, self.endpoints = {}, {}
        secrets = self._secrets(args, child)
        for service in args.services:
            ns = service.metadata.namespace
            deps = [args.crd, args.operator, args.namespaces[ns], *secrets.get(ns, [])]
            opts_ = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=deps))
            key = f"{ns}/{service.metadata.name}"
            self.objects[key] = apply(custom_resource(service), opts_)
            # The operator's gateway Service is named after the LLMService (operator/network.py).
            port = service.spec.gateway.port
            self.endpoints[key] = f"http://{service.metadata.name}.{ns}.svc.cluster.local:{port}"
        self.register_outputs({"endpoints": self.endpoints})

    def _secrets(
        self, args: LLMServicesArgs, child: pulumi.ResourceOptions
    ) -> dict[str, list[pulumi.Resource]]:
        made: dict[str, list[pulumi.Resource]] = {}
        for service in args.services:
            ns = service.metadata.namespace
            in_ns = pulumi.ResourceOptions.merge(
                child, pulumi.ResourceOptions(depends_on=[args.namespaces[ns]])
            )
            secret_name = service.spec.gateway.api_keys_secret
            if secret_name and args.api_keys is not None:
                keys = args.api_keys.apply(functools.partial(_keys_yaml, secret_name=secret_name))
                secret = manifests.opaque_secret(ns, secret_name, "api-keys", KEYS_FILE)
                made.setdefault(ns, []).append(apply(secret, in_ns, string_data={KEYS_FILE: keys}))
        ref = args.hf_token_secret
        if ref is not None and args.hf_token is not None:
            for ns in args.service_namespaces:
                in_ns = pulumi.ResourceOptions.merge(
                    child, pulumi.ResourceOptions(depends_on=[args.namespaces[ns]])
                )
                secret = manifests.opaque_secret(ns, ref.name, "hf-token", ref.key)
                made.setdefault(ns, []).append(apply(secret, in_ns, string_data={ref.key: args.hf_token}))
        return made


def _keys_yaml(all_keys: dict[str, Any], secret_name: str) -> str:
    """`{key: tenant}` for one Secret, as the YAML file the gateway parses."""
    entry = all_keys.get(secret_name)
    if not isinstance(entry, dict) or not entry:
        raise ValueError(f"tokenfleet:apiKeys has no {secret_name!r} mapping of key -> tenant")
    return yaml.safe_dump({str(k): str(v) for k, v in entry.items()}, sort_keys=True)
