# llamarelay in a container: the bot, its default model, and its database on a volume.
#   docker build -t llamarelay .
#   docker run -it -e DISCORD_TOKEN -v llamarelay-data:/app/data llamarelay
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
EXPOSE 8080
ENV PYTHONUNBUFFERED=1
CMD ["llamarelay", "run"]
