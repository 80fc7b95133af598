# resnet-serve images. BuildKit with the frontend built into Docker 23+ (no `# syntax=` line:
# it would pull a frontend image from Docker Hub on every build, which an offline or
# mirrored build cannot). docs/deployment.md has the walk-through.
#
#   export       Python + CPU-only torch: `resnet-export` writes the model repository /models.
#   runtime-gpu  CUDA 13 + cuDNN 9 runtime, onnxruntime-gpu (the `gpu` extra), /models. No torch.
#   runtime-cpu  Python slim, onnxruntime (the `cpu` extra), /models. No torch. (default target)
#
#   docker build --target runtime-gpu -t resnet-serve:gpu .
#   docker build --target runtime-cpu -t resnet-serve:cpu --build-arg MODELS="resnet50 resnet18" .
#
# Weights: by default the export stage downloads each model's published weights (torch.hub)
# into a BuildKit cache mount, so a rebuild does not download them again. To build offline
# or with your own weights, hand a directory in as the `weights` build context; it is seen
# at /weights during the export and merged into the torch hub cache (TORCH_HOME):
#   --build-context weights=DIR            DIR/hub/checkpoints/<file> = a torch.hub cache
#   --build-arg WEIGHTS=/weights/ft.pth    a (fine-tuned) checkpoint inside DIR
#   --build-arg MODEL_NAME=NAME --build-arg LABELS=/weights/labels.txt
#
# Air-gapped: `--build-context wheels=DIR`, a wheelhouse made by tools/wheelhouse.sh on a
# connected machine. Its pip.conf (no-index, find-links=/wheels) is what every pip install
# of the build stages reads (PIP_CONFIG_FILE), so nothing is fetched; without it pip uses
# PyPI. With the `weights` context and the bases from your registry
# (--build-arg PYTHON_IMAGE=..., CUDA_IMAGE=...), a build needs no network at all
# (`docker build --network none`).
#
# tests/deploy/test_container.py builds runtime-cpu with a real engine and tests the image;
# tests/deploy/test_cpu_image.py runs this file's runtime-cpu recipe outside Docker.

# Python of the CPU stages; the GPU stages use Ubuntu 24.04's, also 3.12.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm
# CUDA major and cuDNN major must be those onnxruntime-gpu==ORT_GPU_VERSION is built for:
# 1.31.1 needs CUDA 13.x and cuDNN 9.x (checked by tests/deploy/test_dockerfile.py).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# Empty unless replaced with `--build-context weights=DIR` / `--build-context wheels=DIR`.
FROM scratch AS weights
FROM scratch AS wheels

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS export
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/wheels/pip.conf \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# torch first, from the CPU wheel index: the `export` extra's torch>=2.5 is then satisfied
# and pip does not pull the CUDA build (gigabytes) from PyPI.
RUN --mount=type=bind,from=wheels,target=/wheels \
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml setup.py README.md /src/
COPY contract /src/contract
COPY models /src/models
# The exporter checks its graph with onnxruntime (parity, int8/fp16 checks, the reference
# set for the runtime's self-check); it shares only contract/ with the runtime, but the
# package installs as one (service/ comes along).
COPY service /src/service
RUN --mount=type=bind,from=wheels,target=/wheels \
    pip install "/src[export,cpu]"

# What to build: catalog names (`resnet-export --list`), and where their weights come from.
ARG MODELS=resnet50
ARG WEIGHTS=default
ARG MODEL_NAME=
ARG LABELS=
RUN --mount=type=bind,from=weights,target=/weights \
    --mount=type=cache,id=resnet-serve-torch-hub,target=/cache/torch \
    cp -a /weights/. /cache/torch/ \
    && TORCH_HOME=/cache/torch resnet-export ${MODELS} --repository /models --weights "${WEIGHTS}" \
       ${MODEL_NAME:+--name "${MODEL_NAME}"} ${LABELS:+--labels "${LABELS}"}

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS venv-cpu
ARG ORT_VERSION=1.32.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/wheels/pip.conf \
    VIRTUAL_ENV=/opt/resnet-serve
COPY pyproject.toml setup.py README.md deploy/docker/trim-venv.sh /src/
COPY contract /src/contract
COPY service /src/service
# Only contract/ and service/ are copied: the runtime package has no build step and no
# torch. The venv has no pip of its own (the base's installs into it), and trim-venv.sh
# drops what the server never loads.
RUN --mount=type=bind,from=wheels,target=/wheels \
    python -m venv --without-pip "${VIRTUAL_ENV}" \
    && pip --python "${VIRTUAL_ENV}/bin/python" install "/src[cpu]" "onnxruntime==${ORT_VERSION}" \
    && sh /src/trim-venv.sh "${VIRTUAL_ENV}"

# ---------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS python-gpu
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 resnet \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin resnet

FROM python-gpu AS venv-gpu
ARG ORT_GPU_VERSION=1.31.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/wheels/pip.conf \
    VIRTUAL_ENV=/opt/resnet-serve
COPY pyproject.toml setup.py README.md deploy/docker/trim-venv.sh /src/
COPY contract /src/contract
COPY service /src/service
# Ubuntu's python3 has no pip outside a venv: this venv's own pip installs, then goes.
RUN --mount=type=bind,from=wheels,target=/wheels \
    python3 -m venv "${VIRTUAL_ENV}" \
    && "${VIRTUAL_ENV}/bin/pip" install "/src[gpu]" "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && "${VIRTUAL_ENV}/bin/pip" uninstall -y -q pip \
    && sh /src/trim-venv.sh "${VIRTUAL_ENV}"

# ---------------------------------------------------------------------------------------
FROM python-gpu AS runtime-gpu
# Tuning off: a container's cache is gone at its next start (and the root is read-only), so
# --tuning auto would measure for a minute after every start and keep nothing; measure once
# per node type with `resnet-bench --tune` and ship the file (RESNET_SERVE_TUNING=FILE).
# gRPC off: the images install the runtime without the `grpc` extra (HTTP, V1 and V2).
COPY --from=venv-gpu /opt/resnet-serve /opt/resnet-serve
COPY --from=export /models /models
ENV PATH=/opt/resnet-serve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RESNET_SERVE_REPOSITORY=/models \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000 \
    RESNET_SERVE_DRAIN_TIMEOUT_S=25 \
    RESNET_SERVE_DEVICE=cuda \
    RESNET_SERVE_TUNING=off \
    RESNET_SERVE_GRPC_PORT=0
USER 10001:10001
EXPOSE 8000
# Liveness only; readiness (models warmed up) is GET /readyz, for orchestrators.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RESNET_SERVE_PORT', '8000'), timeout=2)"]
# SIGTERM: /readyz turns 503, accepted requests finish (RESNET_SERVE_DRAIN_TIMEOUT_S), exit 0.
# Give the container longer than twice the drain timeout to stop (docker stop -t 60,
# compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["resnet-serve"]
CMD []

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime-cpu
RUN groupadd --system --gid 10001 resnet \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin resnet
COPY --from=venv-cpu /opt/resnet-serve /opt/resnet-serve
COPY --from=export /models /models
ENV PATH=/opt/resnet-serve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RESNET_SERVE_REPOSITORY=/models \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000 \
    RESNET_SERVE_DRAIN_TIMEOUT_S=25 \
    RESNET_SERVE_DEVICE=cpu \
    RESNET_SERVE_TUNING=off \
    RESNET_SERVE_GRPC_PORT=0
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RESNET_SERVE_PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["resnet-serve"]
CMD []
