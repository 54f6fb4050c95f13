# TTAServe container: one process, one device. Non-root (uid 1000).
#
#   docker build -t ttaserve .                      # serves the built-in demo model, or mount weights
#   docker build -t ttaserve:vitb16 --target baked \
#       --build-arg TTA_MODEL=ViT-B-16-quickgelu --build-arg TTA_PRETRAINED=openai .
#
# The baked target downloads the weights at build time, so the image runs air-gapped.
FROM python:3.11-slim AS runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TTA_HOST=0.0.0.0 \
    TTA_PORT=8000 \
    TTA_DATA_DIR=/data \
    TTA_CACHE_DIR=/models

RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin tta \
    && mkdir -p /data /models /app && chown tta:tta /data /models

WORKDIR /app
# Dependencies first, so code edits do not reinstall torch.
COPY pyproject.toml README.md ./
RUN mkdir -p server adapters clients && touch server/__init__.py adapters/__init__.py clients/__init__.py \
    && pip install . && pip uninstall -y ttaserve
COPY server ./server
COPY adapters ./adapters
COPY clients ./clients
RUN pip install --no-deps . && rm -rf build

USER tta
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"
# One process per GPU: never --workers N with a GPU model.
CMD ["python", "-m", "server"]

FROM runtime AS baked
ARG TTA_MODEL=ViT-B-16-quickgelu
ARG TTA_PRETRAINED=openai
ENV TTA_MODEL=${TTA_MODEL} \
    TTA_PRETRAINED=${TTA_PRETRAINED}
RUN python -m server --preload-only --device cpu
# Weights are in /models now; never reach for the network at run time.
ENV HF_HUB_OFFLINE=1
