"""`python -m tokenfleet.engine.gateway -f service.yaml --replica r0=http://10.0.0.5:8000 ...`

The gateway alone, in front of replicas someone else runs (a benchmark's engines, or a cluster's
pods). On a cluster the operator starts it with `--discover <label selector>` (and
`--weights-configmap`): it then learns the engine pods and canary weights from the Kubernetes
API as they change (discovery.py). `tokenfleet up` embeds the same app next to its local fleet.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvicorn

from tokenfleet.engine.gateway.app import create_app
from tokenfleet.engine.gateway.discovery import DiscoveryConfig, namespace_of_pod
from tokenfleet.engine.gateway.server import freeze_startup_heap, gateway_config
from tokenfleet.spec import SpecError, default_service, load_service


def parse_replica(value: str) -> tuple[str, str]:
    rid, sep, url = value.partition("=")
    if not sep or not rid or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected id=http://host:port, got {value!r}")
    return rid, url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenfleet.engine.gateway")
    parser.add_argument("-f", "--file", help="service YAML (default: the builtin default service)")
    parser.add_argument(
        "--replica", action="append", type=parse_replica, default=[], help="id=url (repeatable)"
    )
    parser.add_argument(
        "--discover",
        metavar="SELECTOR",
        help="watch the EndpointSlices with this label selector for engine pods (in a pod)",
    )
    parser.add_argument("--weights-configmap", help="ConfigMap whose weights.json splits traffic by revision")
    parser.add_argument("--namespace", help="namespace of the slices and the ConfigMap (default: the pod's)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="default: gateway.port")
    args = parser.parse_args(argv)
    try:
        service = load_service(args.file) if args.file else default_service()
    except SpecError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.discover and args.replica:
        parser.error("--discover and --replica exclude each other")
    discovery = None
    if args.discover:
        namespace = args.namespace or namespace_of_pod()
        discovery = DiscoveryConfig(namespace, args.discover, args.weights_configmap)
    app = create_app(service, args.replica, discovery)
    freeze_startup_heap()
    port = args.port or service.spec.gateway.port
    config = gateway_config(app, args.host, port, drain_s=service.spec.engine.shutdown_timeout_s)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
