# syntax=docker/dockerfile:1
#
# Triton Inference Server with the ivvae python-backend models (ivvae_encoder, ivvae_decoder).
#
#   docker build -f docker/triton.Dockerfile -t ivvae-triton .
#   docker run --gpus all --shm-size 8g -v "$PWD/weights:/weights:ro" \
#     -e WEIGHTS_FILE=<file> -e INSTANCE_KIND=KIND_GPU ivvae-triton
#
# At start the entrypoint exports TorchScript/ONNX artifacts from /weights into /artifacts
# (skipped when they are current), prepares a copy of the model repository, then execs
# tritonserver. Weights are never part of the image: they are mounted at run time.
# GPU vs CPU differences (instance kind, precision, shm size): docs/deploy.md.

# Base images are literal (not build args) so that hadolint can check their tags.

# -- wheel: build the ivvae wheel apart, so no source tree lands in the Triton image ----------
FROM python:3.11.11-slim-bookworm AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist /src

# -- runtime ------------------------------------------------------------------------------------
# Triton 2.51 with the PyTorch-enabled python backend: the same server release as the
# nvidia-pytriton wheel that the CPU tests run.
FROM nvcr.io/nvidia/tritonserver:24.10-pyt-python-py3 AS runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# The image's CUDA torch must survive: pin it to the installed build (a version like
# 2.5.0a0+<sha>.nv24.10), so that pip resolves the ivvae dependencies around it instead of
# replacing it with a PyPI wheel. numpy is held below 2 by ivvae's own requirement.
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    python3 -c 'import torch; print(f"torch=={torch.__version__}")' > /tmp/keep-torch.txt \
 && python3 -m pip install --no-cache-dir --constraint /tmp/keep-torch.txt /dist/ivvae-*.whl \
 && rm /tmp/keep-torch.txt \
 && python3 -c 'import ivvae.config, numpy, torch, tritonclient.grpc.model_config_pb2; assert int(numpy.__version__.split(".")[0]) < 2'

# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 ivvae \
 && useradd --system --uid 10001 --gid ivvae --home-dir /home/ivvae --create-home \
      --shell /usr/sbin/nologin ivvae \
 && mkdir -p /weights /artifacts \
 && chown ivvae:ivvae /artifacts
# (A named volume mounted on /artifacts starts out with this directory's owner.)

COPY model_repository /opt/ivvae/model_repository
COPY --chmod=0755 docker/triton-entrypoint.sh docker/triton_prepare.py docker/healthcheck.py \
     /opt/ivvae/bin/

USER 10001:10001
WORKDIR /home/ivvae

EXPOSE 8000 8001 8002

# Export plus model load can take minutes on first start; the start period covers it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "/opt/ivvae/bin/healthcheck.py", "http://127.0.0.1:8000/v2/health/ready"]

# NVIDIA's entrypoint first (driver / CUDA compatibility checks), then ours.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/opt/ivvae/bin/triton-entrypoint.sh"]
CMD ["serve"]
