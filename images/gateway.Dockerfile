# syntax=docker/dockerfile:1.7
# The gateway in front of the engine replicas (`python -m tokenfleet.engine.gateway`), without
# vLLM, torch or transformers. Build from the repository root:
#   docker build -f images/gateway.Dockerfile -t tokenfleet-gateway:<version> .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tokenfleet/ tokenfleet/
COPY engine/ engine/
COPY kernels/ kernels/
COPY observability/ observability/
COPY operator/ operator/
COPY load/ load/
COPY infra/ infra/
# Exactly the gateway's imports (engine/gateway/, observability/tracing.py).
RUN pip install /src "fastapi>=0.110" "uvicorn>=0.29" "uvloop>=0.19" "httptools>=0.6" \
    "prometheus-client>=0.20" "opentelemetry-sdk~=1.30" "opentelemetry-exporter-otlp-proto-http~=1.30"

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 tokenfleet \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tokenfleet
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "tokenfleet.engine.gateway"]
CMD ["--host", "0.0.0.0"]
