# One image for the worker and the beat (docker-compose.yml picks the command).
FROM python:3.11-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends coreutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks
RUN pip install --no-cache-dir .
# Celery refuses to run as root without C_FORCE_ROOT; the clone dirs are root-owned on VM hosts.
ENV C_FORCE_ROOT=1
CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO"]
