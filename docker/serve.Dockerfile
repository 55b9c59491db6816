# nnserve serving image: the `serve` extras only (no torch), a non-root user, the shipped models
# baked in at /models (mount another repository read-only over it to serve other models).
#
#   docker build -f docker/serve.Dockerfile -t nnserve-serve .
#   docker run --rm -p 50051:50051 nnserve-serve classify
#
# BASE_IMAGE defaults to the public slim Python image; any Debian-based image with Python 3.11+
# on PATH as python3 works (CI builds one locally with debootstrap: scripts/docker-base.sh). With
# WHEELS=local, dependencies come only from docker/wheels/ (fill it on the host:
# pip download -d docker/wheels -c constraints/serve.txt '.[serve]' 'setuptools>=77'), for offline
# builds. Either way the versions are those pinned in constraints/serve.txt (scripts/lock_serve.py).
ARG BASE_IMAGE=python:3.11-slim

# Build stage: install into a venv without pip, so neither pip, the wheels nor the sources'
# build leftovers reach the final image's layers.
FROM ${BASE_IMAGE} AS build
ARG WHEELS=pypi
# PIP_CONSTRAINT, unlike -c, reaches pip's isolated build environment too (setuptools).
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT=/constraints/serve.txt
WORKDIR /src
COPY docker/wheels/ /wheels/
COPY constraints/serve.txt /constraints/serve.txt
COPY pyproject.toml README.md ./
COPY services/ services/
RUN python3 -m venv --without-pip /opt/nnserve \
    && if [ "$WHEELS" = "local" ]; then set -- --no-index --find-links /wheels; fi \
    && python3 -m pip --python /opt/nnserve/bin/python install "$@" ".[serve]"

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/nnserve/bin:$PATH
COPY --from=build /opt/nnserve /opt/nnserve
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin nnserve
COPY --chown=root:root models/ /models/

USER 10001
ENV NNSERVE_CLASSIFY_MODEL_REPOSITORY=/models NNSERVE_RESTORE_MODEL_REPOSITORY=/models \
    NNSERVE_GENERATE_MODEL_REPOSITORY=/models \
    NNSERVE_CLASSIFY_HOST=0.0.0.0 NNSERVE_RESTORE_HOST=0.0.0.0 NNSERVE_GENERATE_HOST=0.0.0.0
EXPOSE 50051 50052 50053 9101 9102 9103
# NNSERVE_HEALTH_TARGET is set per service (compose does); the default fits `classify`.
ENV NNSERVE_HEALTH_TARGET=127.0.0.1:50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 CMD ["nnserve", "health"]
ENTRYPOINT ["nnserve", "serve"]
CMD ["classify"]
