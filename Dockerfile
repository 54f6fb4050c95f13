# syntax=docker/dockerfile:1.7
# TTAServe images: one server process, one device, uid 1000. Targets (README, "Deployment"):
#
#   docker build -t ttaserve .                      # gpu (the default): CUDA 13 torch, needs NVIDIA driver >= 580
#   docker build -t ttaserve:cpu --target cpu .     # CPU-only torch from the CPU wheel index, no CUDA libraries
#   docker build -t ttaserve:vitb16 --target baked \
#       --build-arg TTA_MODEL=ViT-B-16-quickgelu --build-arg TTA_PRETRAINED=openai .
#
# Install and start steps live in deploy/scripts/ so the host runs the same ones in CI. Layer order: the
# lock and the install scripts first, so a code or README edit never reinstalls torch; pip's cache is a
# BuildKit cache mount, so a lock edit downloads only what changed.

FROM python:3.11.14-slim-bookworm AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TTA_HOST=0.0.0.0 \
    TTA_PORT=8000 \
    TTA_DATA_DIR=/data \
    TTA_CACHE_DIR=/models \
    HF_HOME=/models/hf
# jemalloc as the allocator: in the 10-minute soak (README, "Soak") resident memory follows the text caches'
# budget and stays flat once they are full, where glibc's malloc kept growing (MALLOC_ARENA_MAX changed nothing).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2=5.3.0-1 \
    && rm -rf /var/lib/apt/lists/*
ENV LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
# uid and gid 1000 by number, so Kubernetes' runAsNonRoot can verify them; /data and /models are theirs.
RUN groupadd --gid 1000 tta \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /app --shell /usr/sbin/nologin tta \
    && mkdir -p /data /models /app \
    && chown 1000:1000 /data /models \
    && python -m venv /opt/venv
WORKDIR /app
COPY deploy/scripts/install.sh deploy/scripts/lock.py deploy/scripts/start.sh deploy/scripts/healthcheck.py \
     deploy/scripts/
VOLUME ["/data"]
EXPOSE 8000
# Exec form; the script reads TTA_PORT, so a container on another port stays healthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/app/deploy/scripts/healthcheck.py"]
# One process per GPU: never --workers N with a GPU model. exec in start.sh: SIGTERM reaches the server.
CMD ["/app/deploy/scripts/start.sh"]

# The runtime dependencies with CUDA torch, exactly as locked (hashes checked).
FROM base AS deps-gpu
COPY requirements/runtime.lock requirements/
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    deploy/scripts/install.sh deps

# The same with CPU torch and torchvision from the CPU wheel index, and no CUDA libraries.
FROM base AS deps-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements/runtime.lock requirements/
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    TORCH_INDEX_URL="${TORCH_INDEX_URL}" deploy/scripts/install.sh deps

# TTAServe's own wheel (the code, the shipped demo models, the web page), built with the locked setuptools.
FROM base AS wheel
COPY pyproject.toml README.md ./
COPY server server/
COPY adapters adapters/
COPY requirements/runtime.lock requirements/
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    deploy/scripts/install.sh wheel /dist

FROM deps-cpu AS cpu
COPY --from=wheel /dist /dist
RUN deploy/scripts/install.sh app /dist && deploy/scripts/install.sh check cpu
USER 1000:1000

FROM deps-gpu AS cuda
COPY --from=wheel /dist /dist
RUN deploy/scripts/install.sh app /dist && deploy/scripts/install.sh check
USER 1000:1000

# Real weights baked in at build time (into /models, as uid 1000): the image runs air-gapped.
FROM cuda AS baked
ARG TTA_MODEL=ViT-B-16-quickgelu
ARG TTA_PRETRAINED=openai
ENV TTA_MODEL=${TTA_MODEL} \
    TTA_PRETRAINED=${TTA_PRETRAINED}
RUN python -m server --preload-only --device cpu
ENV HF_HUB_OFFLINE=1

# The default target: the CUDA image.
FROM cuda AS gpu
