# lipsync-cluster images for KubeRay (k8s/): one Dockerfile, two targets.
#   docker build --target cpu -t lipsync-cluster:cpu .   # slim Python, onnxruntime on CPU (overlay k8s/overlays/cpu)
#   docker build --target gpu -t lipsync-cluster:gpu .   # CUDA 12 + cuDNN 9 runtime (overlay k8s/overlays/gpu)
# Both run Python 3.12: every node of a Ray cluster (and a client joining it) needs the same
# Python minor version and the same Ray version. The install step is the README's
# (`pip install -e ".[dev]"` without the dev extra); tests/test_dockerfile.py keeps them equal.

FROM python:3.12-slim-bookworm AS cpu-base
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS gpu-base
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv wget ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# ---- cpu image ---------------------------------------------------------------------------
FROM cpu-base AS cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app \
    LIPSYNC_STORAGE_ROOT=/data/lipsync LIPSYNC_LOG_FORMAT=json
WORKDIR /app
COPY pyproject.toml README.md serve_app.py ./
COPY cluster ./cluster
COPY actors ./actors
COPY service ./service
RUN pip install -e .
RUN useradd --create-home --uid 1000 ray && mkdir -p /data/lipsync && chown -R 1000:1000 /data
USER 1000
EXPOSE 6379 8000 8080 8265 10001

# ---- gpu image ---------------------------------------------------------------------------
FROM gpu-base AS gpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app \
    LIPSYNC_STORAGE_ROOT=/data/lipsync LIPSYNC_LOG_FORMAT=json
WORKDIR /app
COPY pyproject.toml README.md serve_app.py ./
COPY cluster ./cluster
COPY actors ./actors
COPY service ./service
RUN pip install -e .
RUN (id -u 1000 >/dev/null 2>&1 || useradd --create-home --uid 1000 ray) \
 && mkdir -p /data/lipsync && chown -R 1000:1000 /data
USER 1000
EXPOSE 6379 8000 8080 8265 10001
