# syntax=docker/dockerfile:1.7
# The engine on GPU nodes: vLLM's official image (CUDA, vLLM 0.32.0) plus tokenfleet's SLA
# scheduler and kernels plugin, run as a non-root user. Build from the repository root:
#   docker build -f images/engine-gpu.Dockerfile -t tokenfleet-engine-gpu:<version> .
# CI pins the base by digest at build time (--build-arg VLLM_IMAGE=vllm/vllm-openai@sha256:...).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

FROM ${VLLM_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tokenfleet/ tokenfleet/
COPY engine/ engine/
COPY kernels/ kernels/
COPY observability/ observability/
COPY operator/ operator/
COPY load/ load/
COPY infra/ infra/
# vLLM and torch come from the base image: install tokenfleet without touching them.
RUN python3 -m pip install --no-deps /src \
    && python3 -m pip install "fastapi>=0.110" "uvicorn>=0.29" "uvloop>=0.19" "httptools>=0.6" \
        "prometheus-client>=0.20" "httpx>=0.27" "opentelemetry-sdk~=1.30" \
        "opentelemetry-exporter-otlp-proto-http~=1.30" \
    && rm -rf /src \
    && groupadd --gid 10001 tokenfleet \
    && useradd --uid 10001 --gid 10001 --home-dir /home/tokenfleet --create-home --shell /usr/sbin/nologin tokenfleet \
    && mkdir -p /cache/huggingface && chown 10001:10001 /cache/huggingface
ENV PYTHONUNBUFFERED=1 HF_HOME=/cache/huggingface HOME=/home/tokenfleet
USER 10001:10001
WORKDIR /home/tokenfleet
EXPOSE 8000
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
