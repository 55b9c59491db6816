# nnserve serving image for NVIDIA GPUs: onnxruntime-gpu on a CUDA runtime base. The CUDA
# execution provider is chosen by environment, e.g. NNSERVE_CLASSIFY_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider
# (an unavailable provider is skipped with a warning, so the image also runs on CPU).
#
#   docker build -f docker/serve-gpu.Dockerfile -t nnserve-serve-gpu .
#   docker run --gpus all --rm -p 50051:50051 -e NNSERVE_CLASSIFY_PROVIDERS=CUDAExecutionProvider nnserve-serve-gpu classify
ARG BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/nnserve
COPY pyproject.toml README.md ./
COPY services/ services/
# The serve extras, with onnxruntime-gpu in place of the CPU build.
RUN pip install ".[serve]" && pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.20" \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin nnserve
COPY models/ /models/

USER 10001
ENV NNSERVE_CLASSIFY_MODEL_REPOSITORY=/models NNSERVE_RESTORE_MODEL_REPOSITORY=/models \
    NNSERVE_GENERATE_MODEL_REPOSITORY=/models \
    NNSERVE_CLASSIFY_HOST=0.0.0.0 NNSERVE_RESTORE_HOST=0.0.0.0 NNSERVE_GENERATE_HOST=0.0.0.0 \
    NNSERVE_CLASSIFY_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider \
    NNSERVE_RESTORE_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider \
    NNSERVE_GENERATE_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider \
    NNSERVE_HEALTH_TARGET=127.0.0.1:50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 CMD ["nnserve", "health"]
ENTRYPOINT ["nnserve", "serve"]
CMD ["classify"]
