# syntax=docker/dockerfile:1
#
# felis API image: FastAPI + CPU-only PyTorch + ONNX Runtime, no CUDA libraries.
#
#   docker build -f docker/api.Dockerfile -t felis-api .
#
# Also serves as the CPU worker image (docker-compose.cpu.yml, k8s/overlays/cpu):
# run it with `felis worker --queues gpu --concurrency 1` and FELIS_DEVICE=cpu.

ARG PYTHON_IMAGE=python:3.12.12-slim-trixie

# --- build: a virtualenv in /opt/venv with the project and its dependencies -----
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CPU wheel index (~200 MB instead of several GB of CUDA wheels),
# in its own layer so that code changes do not download it again. `pip install .` below
# then finds torch==2.14.1 (+cpu) already satisfied and keeps it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY worker ./worker
COPY models ./models
COPY felis_client ./felis_client
# Both distributions in one call: the server's felis-client==0.1.0 comes from ./felis_client
# (the client commands of `felis`), and the s3 extra brings boto3 (FELIS_STORAGE_BACKEND=s3).
# "./[s3]", not ".[s3]": hadolint (DL3013) takes only ./ and / as local paths, not package names.
RUN pip install ./felis_client "./[s3]" && python -m compileall -q /opt/venv

# --- runtime: the virtualenv, a non-root user, nothing else ----------------------
FROM ${PYTHON_IMAGE} AS runtime

# One fixed uid/gid in both images, so the shared /data volume is writable by the API
# and the workers alike (Kubernetes: runAsUser/fsGroup 10001).
RUN groupadd --system --gid 10001 felis \
    && useradd --system --uid 10001 --gid felis --create-home --home-dir /home/felis \
        --shell /usr/sbin/nologin felis \
    && mkdir -p /data \
    && chown felis:felis /data

COPY --from=build /opt/venv /opt/venv

# Listening on every interface (for -p 8000:8000) needs API keys: felis refuses 0.0.0.0 without
# them. A lone `docker run` is embedded mode (SQLite and blobs under /data); make its first key
# with `docker exec <container> felis keys create --scope admin`. In embedded mode the API only
# answers for localhost, 127.0.0.1 and [::1]: add the names it is reached by to FELIS_ALLOWED_HOSTS
# (`-e FELIS_ALLOWED_HOSTS=felis.lan`). Compose and Kubernetes run it in production mode.
# DL3064 takes FELIS_API_KEYS_REQUIRED for a secret by its name; it is a switch, not a key.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FELIS_HOST=0.0.0.0 \
    FELIS_API_KEYS_REQUIRED=true \
    FELIS_PORT=8000 \
    FELIS_DATA_DIR=/data \
    FELIS_LOG_JSON=true

USER 10001:10001
WORKDIR /home/felis
EXPOSE 8000

# Liveness only (/healthz): readiness (/readyz) also checks database, storage and
# broker, and a container should not be marked unhealthy because PostgreSQL restarts.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FELIS_PORT', '8000'), timeout=4)"]

CMD ["felis", "api"]
