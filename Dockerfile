# ppcl runtime image: every pipeline step and the multi-node TrainJob run in it.
#   docker build -t ghcr.io/ppcl/ppcl:0.1.0 .                                     # CUDA 12.8 torch (GPU nodes)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu --build-arg PPCL_EXTRAS= \
#     -t ppcl:cpu .                                                                # CPU only
#
# Base: Debian slim with CPython 3.11 (pyproject requires 3.11), pinned tag. The CUDA user-space libraries
# (cuBLAS, cuDNN, NCCL, ...) come with the CUDA build of torch from TORCH_INDEX as nvidia-* wheels, the same
# way PyTorch's own images get them; the driver comes from the GPU node (NVIDIA device plugin / container
# toolkit). An nvidia/cuda base would only add a second, unused copy of those libraries, and its Ubuntu has
# no Python 3.11 release.
FROM python:3.11.14-slim-bookworm

# The torch version must equal the pin in constraints.txt (tests/test_manifests.py checks it): the CUDA build
# of the same release, from PyTorch's wheel index, so `pip install -c constraints.txt .` below keeps it.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# Extras of pyproject installed on top: cuda = bitsandbytes (8-bit AdamW, `use_8bit_adam`, on by default: a CUDA
# run without it stops with an error rather than silently training with fp32 AdamW). Empty for the CPU image.
ARG PPCL_EXTRAS=cuda

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/ppcl \
    PPCL_MANIFESTS_DIR=/opt/ppcl/manifests

RUN groupadd --gid 10001 ppcl \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/ppcl --shell /usr/sbin/nologin ppcl

WORKDIR /opt/ppcl

RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# Dependencies first (cached layer as long as pyproject/constraints do not change), then the package itself:
# the same pins as a developer's `pip install -c constraints.txt -e .`. Only the library: every step runs
# `ppcl.stages`; ppcl_kfp (`ppcl pipeline`, `ppcl demo`) drives components/ and pipelines/ of a source checkout,
# which the image does not hold, so the image's `ppcl --help` leaves those two commands out.
COPY pyproject.toml constraints.txt README.md ./
COPY ppcl ./ppcl
COPY manifests/trainjob ./manifests/trainjob
RUN pip install --no-cache-dir -c constraints.txt . \
    && if [ -n "${PPCL_EXTRAS}" ]; then pip install --no-cache-dir -c constraints.txt ".[${PPCL_EXTRAS}]"; fi \
    && python -c "import torch, ppcl; print('ppcl', ppcl.__version__, 'torch', torch.__version__)"

USER 10001:10001
WORKDIR /home/ppcl
ENTRYPOINT ["ppcl"]
CMD ["--help"]
