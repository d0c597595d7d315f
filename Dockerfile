# llamarelay in a container: the bot, its default model, and its database on a volume.
#   docker build -t llamarelay .
#   docker run -it -e DISCORD_TOKEN -v llamarelay-data:/app/data llamarelay
# or `docker compose up` (compose.yaml). Any setting can be changed with LLAMARELAY_<SECTION>__<KEY>=value.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY adapters ./adapters
# llama-cpp-python compiles llama.cpp here (several minutes).
RUN pip install --no-cache-dir .

COPY config.toml ./
RUN mkdir -p models && llamarelay fetch-model

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
