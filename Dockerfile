# The shardnet image: `docker build -t shardnet:0.1.0 .`, then `docker run shardnet:0.1.0 worker --uses MODULE:CLASS`.
# Add your own Executor in an image of your own; this one ends as uid 10001, which may not install packages:
#     FROM shardnet:0.1.0
#     USER root
#     RUN pip install your-package
#     USER 10001:10001
# The manifests of `shardnet k8s render` run the image as uid 10001 with a read-only root filesystem.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY shardnet ./shardnet
# the metrics extra: `shardnet k8s render --metrics` runs heads and workers with --metrics-port
RUN pip install '.[metrics]' \
 && rm -rf /build \
 && groupadd --system --gid 10001 shardnet \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin shardnet

WORKDIR /app
# numeric, so that Kubernetes' runAsNonRoot can check it
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["shardnet"]
CMD ["--help"]
