# syntax=docker/dockerfile:1.7
# Locust master/workers running load/locustfiles/tokenfleet_llm.py (infra/loadgen.py points
# at /app/load/...). Build from the repository root:
#   docker build -f images/load.Dockerfile -t tokenfleet-load:<version> .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tokenfleet/ tokenfleet/
COPY engine/ engine/
COPY kernels/ kernels/
COPY observability/ observability/
COPY operator/ operator/
COPY load/ load/
COPY infra/ infra/
RUN pip install "/app[load]"

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 tokenfleet \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tokenfleet
COPY --from=build /opt/venv /opt/venv
# The locustfile and the workloads' data files, read from /app/load at run time.
COPY load/ /app/load/
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /app
EXPOSE 5557 8089
ENTRYPOINT ["python", "-m", "locust"]
CMD ["--help"]
