# nnserve training image: torch and the training package; writes models into a mounted repository.
#
#   docker build -f docker/train.Dockerfile -t nnserve-train .
#   docker run --rm -v "$PWD/models:/work/models" -v /usr/share/datasets/fashion-mnist:/data:ro \
#       nnserve-train python -m training.train_classifier --data-dir /data --out /work/models/classifier/2
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /work
COPY pyproject.toml README.md ./
COPY services/ services/
COPY training/ training/
RUN pip install ".[serve,train]" && useradd --system --uid 10001 --create-home nnserve
USER 10001
CMD ["python", "-m", "training.train_classifier", "--help"]
