# cua-kit on an NVIDIA GPU machine: the kit with its vllm and unsloth extras, for `compose.yaml` or plain
# `docker run` (docs/training.md, "Multi-GPU and multi-node"). Build and run:
#   docker build -t cua-kit .
#   docker run --gpus all --ipc=host --env-file .env -v "$PWD/outputs:/app/outputs" cua-kit \
#       cua-kit train configs/multi_gpu.yaml
# MiniWoB++ needs Debian's Chromium, which Ubuntu ships only as a snap: use the synth or GBox envs in this image.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HF_HOME=/cache/huggingface
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv && pip install --upgrade pip

WORKDIR /app
# dependencies first (a layer that survives code edits): vllm brings the CUDA build of torch it was built with
COPY pyproject.toml README.md ./
COPY cua_kit/__init__.py cua_kit/__init__.py
COPY app/__init__.py app/__init__.py
RUN pip install -e ".[vllm,unsloth,app,gbox,wandb]"
COPY cua_kit cua_kit
COPY app app
COPY configs configs
COPY data data
COPY bench bench

EXPOSE 7860
CMD ["cua-kit", "--help"]
