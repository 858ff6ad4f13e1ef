# syntax=docker/dockerfile:1.7
# The kopf operator (`tokenfleet operator run`). Build from the repository root:
#   docker build -f images/operator.Dockerfile -t tokenfleet-operator:<version> .
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
# The operator exports its own metrics (prometheus-client) and reads gateway API-key files.
RUN pip install "/src[operator]" "prometheus-client>=0.20"

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 tokenfleet \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tokenfleet
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["tokenfleet"]
CMD ["operator", "run"]
