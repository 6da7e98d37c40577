# mirror: a pull-through caching registry mirror.
#   docker build -t mirror . && docker run -p 5000:5000 -v mirror-cache:/var/lib/mirror mirror
# The config is /etc/mirror/mirror.yaml (the shipped deploy/mirror.yaml); mount your own
# there, or set MIRROR_CONFIG to another path.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirror ./mirror
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/mirror --create-home mirror
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links=/wheels mirror \
    && rm -rf /wheels
COPY deploy/mirror.yaml /etc/mirror/mirror.yaml
ENV MIRROR_CONFIG=/etc/mirror/mirror.yaml
USER mirror
VOLUME /var/lib/mirror
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=4)"]
# mirror serve reads MIRROR_CONFIG, and any other MIRROR_* variable, itself.
CMD ["mirror", "serve"]
