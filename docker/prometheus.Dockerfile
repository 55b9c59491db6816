# Prometheus from Debian's package, for machines without an image registry (the end-to-end test
# builds it on the local debootstrap base). Laid out like prom/prometheus: config at
# /etc/prometheus/prometheus.yml, data in /prometheus, listening on 9090, running unprivileged.
#
#   docker build -f docker/prometheus.Dockerfile --build-arg BASE_IMAGE=nnserve-base:bookworm -t nnserve-prometheus .
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
    && mkdir -p /prometheus && chown nobody:nogroup /prometheus
# The scrape config and its alerting rules (compose mounts the same two files over these).
COPY docker/prometheus/prometheus.yml docker/prometheus/alerts.yml /etc/prometheus/
USER nobody
EXPOSE 9090
VOLUME ["/prometheus"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.listen-address=:9090"]
