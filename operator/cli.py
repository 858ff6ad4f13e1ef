"""`tokenfleet operator run` and `tokenfleet spec crd`: the operator's command-line surface."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import replace
from typing import Any

import yaml

from tokenfleet.operator.crd import crd_manifest


def cmd_spec_crd(args: argparse.Namespace) -> int:
    print(yaml.safe_dump(crd_manifest(), sort_keys=False, width=100), end="")
    return 0


def cmd_operator_run(args: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import start_http_server

    from tokenfleet.operator.handlers import OperatorConfig, build_registry
    from tokenfleet.operator.metrics import GatewayScraper
    from tokenfleet.operator.model import Conventions

    level = os.environ.get("TOKENFLEET_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    conventions = Conventions.from_env(os.environ)
    if args.gateway_image:
        conventions = replace(conventions, gateway_image=args.gateway_image)
    config = OperatorConfig(conventions=conventions, control_interval_s=args.interval)
    # The scraper times its scrapes on the clock rollout steps are stamped with.
    config.metrics_source = GatewayScraper(conventions, clock=config.clock)
    registry, _ = build_registry(config)
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=config.metrics.registry)
    namespaces: dict[str, Any] = {"namespaces": args.namespace} if args.namespace else {"clusterwide": True}
    # One replica (Recreate) and standalone: kopf peering would freeze duplicates anyway.
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,
            liveness_endpoint=args.liveness or None,
            **namespaces,
        )
    )
    return 0


def register(sub: Any, spec_sub: Any) -> None:
    """Add `operator run` under `sub` and `crd` under `tokenfleet spec`."""
    spec_sub.add_parser("crd", help="print the LLMService CustomResourceDefinition (YAML)").set_defaults(
        handler=cmd_spec_crd
    )
    operator = sub.add_parser("operator", help="the Kubernetes operator for LLMService")
    operator_sub = operator.add_subparsers(dest="operator_command", required=True)
    run = operator_sub.add_parser(
        "run", help="run the operator against the current kubeconfig / service account"
    )
    run.add_argument("-n", "--namespace", action="append", help="serve only these namespaces (repeatable)")
    run.add_argument("--interval", type=float, default=15.0, help="control loop period, seconds")
    run.add_argument("--metrics-port", type=int, default=9100, help="Prometheus metrics port (0: off)")
    run.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="kopf's liveness endpoint URL, as `kopf run --liveness` ('' turns it off)",
    )
    run.add_argument(
        "--gateway-image",
        help="image that runs `python -m tokenfleet.engine.gateway` (default: $TOKENFLEET_GATEWAY_IMAGE)",
    )
    run.set_defaults(handler=cmd_operator_run)
