# llamarelay in a container: the bot, its default model, and its database on a volume.
#   docker build -t llamarelay .
#   docker run -it -e DISCORD_TOKEN -v llamarelay-data:/app/data llamarelay
# or `docker compose up` (compose.yaml). Any setting can be changed with LLAMARELAY_<SECTION>__<KEY>=value.
# For an NVIDIA GPU, llama.cpp built with CUDA on NVIDIA's CUDA image, run with --gpus all (see "GPU" in the README):
#   docker build -t llamarelay-cuda --build-arg BASE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#       --build-arg CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=off" .
#   docker run -it --gpus all -e DISCORD_TOKEN -v llamarelay-data:/app/data llamarelay-cuda
# Any base with Python 3.11 or newer, or none (Ubuntu 24.04's 3.12 is installed then; 22.04's 3.10 is too old).
ARG BASE=python:3.11-slim
FROM ${BASE}
# Passed to llama.cpp's CMake build by pip. -DGGML_NATIVE=off for CUDA: the build has no GPU to tune for.
ARG CMAKE_ARGS=""

RUN export DEBIAN_FRONTEND=noninteractive && apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && if ! command -v python3 >/dev/null; then apt-get install -y --no-install-recommends python3 python3-venv; fi \
    && rm -rf /var/lib/apt/lists/*
# A venv: Ubuntu's Python refuses packages installed beside its own.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY adapters ./adapters
# llama-cpp-python compiles llama.cpp here (several minutes).
RUN pip install --no-cache-dir .

COPY config.toml ./
# Without loading llama.cpp: a CUDA build needs the driver (libcuda.so.1), which only `docker run --gpus` brings.
RUN python -c "from pathlib import Path; from bot.default_model import DEFAULT_MODEL_FILE, fetch_default_model; \
fetch_default_model(Path('models') / DEFAULT_MODEL_FILE)"

# SQLite lives here; mount a volume so conversations survive a new container.
VOLUME /app/data
EXPOSE 8080 9090
ENV PYTHONUNBUFFERED=1
# /healthz, /readyz and /metrics on port 9090, reachable from the container network (for Prometheus); publish
# the port only to a trusted network. Settings come from the environment, config.toml stays as shipped.
ENV LLAMARELAY_OPS__ENABLED=true \
    LLAMARELAY_OPS__HOST=0.0.0.0 \
    LLAMARELAY_OPS__PORT=9090
# No curl in the image: the standard library asks /healthz (urlopen raises on a refused connection or a non-2xx).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LLAMARELAY_OPS__PORT', '9090'), timeout=4)"]
CMD ["llamarelay", "run"]
