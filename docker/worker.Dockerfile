# syntax=docker/dockerfile:1
#
# felis GPU worker image: Celery worker + CUDA build of PyTorch.
#
#   docker build -f docker/worker.Dockerfile -t felis-worker .
#
# One container per GPU: run `felis worker --queues gpu --concurrency 1` with one GPU
# visible (docker-compose.yml, k8s/overlays/gpu). Needs an NVIDIA driver >= 580 on the
# host (CUDA 13.0) and the NVIDIA Container Toolkit.
#
# The base is NVIDIA's `base` flavour (CUDA runtime + the env vars the container toolkit
# reads), not `runtime`/`cudnn-runtime`: the PyTorch wheels bring their own cuBLAS,
# cuDNN, NCCL..., so a fuller base would only ship a second, unused copy (~3 GB).

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

# --- build: a virtualenv in /opt/venv with the project and its dependencies -----
FROM ${CUDA_IMAGE} AS build

ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu 24.04's Python 3.12. Apt versions are not pinned (DL3008): Ubuntu replaces them
# with each security update, and a pin would break the build instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, built for CUDA 13.0 to match the base image, in its own layer.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
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

# --- runtime: the interpreter, the virtualenv and a non-root user ------------------
FROM ${CUDA_IMAGE} AS runtime

ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 felis \
    && useradd --system --uid 10001 --gid felis --create-home --home-dir /home/felis \
        --shell /usr/sbin/nologin felis \
    && mkdir -p /data \
    && chown felis:felis /data

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FELIS_DATA_DIR=/data \
    FELIS_LOG_JSON=true \
    FELIS_DEVICE=cuda

USER 10001:10001
WORKDIR /home/felis

# Healthy while this container's Celery node answers a broadcast ping (any node name,
# matched on the hostname). Informational: nothing restarts on it. Kubernetes runs no
# liveness probe on workers, so a broker outage cannot kill a training in progress.
HEALTHCHECK --interval=60s --timeout=20s --start-period=120s --retries=3 \
    CMD ["/bin/sh", "-c", "celery --broker \"$FELIS_BROKER_URL\" inspect ping --json --timeout 5 | grep -q \"@$HOSTNAME\\b\""]

CMD ["felis", "worker", "--queues", "gpu", "--concurrency", "1"]
