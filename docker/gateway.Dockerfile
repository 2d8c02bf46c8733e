# syntax=docker/dockerfile:1
#
# The ivvae gateway: HTTP (FastAPI) on 8000 and gRPC on 50051, talking to Triton and Redis.
#
#   docker build -f docker/gateway.Dockerfile -t ivvae-gateway .                       # no torch
#   docker build -f docker/gateway.Dockerfile --build-arg WITH_TORCH=1 -t ivvae-gateway:torch .
#
# WITH_TORCH=1 adds CPU-only torch, needed for IVVAE_BACKEND=local (in-process model) and for
# `ivvae export`. A gateway in front of Triton (IVVAE_BACKEND=triton) does not need it.
# Settings are IVVAE_* environment variables; see service/ivvae/config.py and docs/deploy.md.

# Base images are literal (not build args) so that hadolint can check their tags; both stages
# use the same one, because the venv's interpreter path must exist in the runtime stage.

# -- build: a virtual environment with the package and its dependencies ----------------------
FROM python:3.11.11-slim-bookworm AS build

ARG WITH_TORCH=0
ARG TORCH_VERSION=2.13.0
# PyPI's Linux torch wheels pull in several GB of CUDA libraries; the CPU index does not.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service

# torch goes in first, from the CPU index, so that the [torch] extra finds it satisfied.
RUN case "${WITH_TORCH}" in \
      0) pip install --no-cache-dir /src ;; \
      1) pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
         && pip install --no-cache-dir "/src[torch]" ;; \
      *) echo "WITH_TORCH must be 0 or 1, got '${WITH_TORCH}'" >&2; exit 1 ;; \
    esac \
 && python -c "import ivvae.config"

# -- runtime: the venv, a non-root user, nothing else ------------------------------------------
FROM python:3.11.11-slim-bookworm AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IVVAE_HOST=0.0.0.0

# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 ivvae \
 && useradd --system --uid 10001 --gid ivvae --home-dir /home/ivvae --create-home \
      --shell /usr/sbin/nologin ivvae

COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/ivvae/healthcheck.py

USER 10001:10001
WORKDIR /home/ivvae

EXPOSE 8000 50051

# Liveness only (GET /healthz on IVVAE_PORT); readiness is /readyz, checked by orchestrators.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "/opt/ivvae/healthcheck.py"]

ENTRYPOINT ["ivvae"]
CMD ["serve"]
