# The gateway image: the same package as `pip install .`, its dependencies installed only from requirements.lock
# (exact versions with hashes: `make lock`), run as an unprivileged user (uid 10001, which owns the room PC's secret
# files) in the dialout group (serial ports), with its outbox on a volume.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY devices ./devices
COPY simulators ./simulators
COPY dashboards ./dashboards
COPY devtools ./devtools
COPY clients ./clients
# The project itself, with nothing fetched: its dependencies and build backend are the locked ones above.
RUN pip install --no-deps --no-build-isolation --no-index . \
 && pip check \
 && useradd --system --uid 10001 --groups dialout --home /var/lib/infusion-telemetry infusion \
 && mkdir -p /var/lib/infusion-telemetry /etc/infusion-telemetry \
 && chown infusion /var/lib/infusion-telemetry

USER infusion
VOLUME ["/var/lib/infusion-telemetry"]
EXPOSE 8321
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8321/health', timeout=4)"]
ENTRYPOINT ["infusion-telemetry"]
CMD ["run", "--config", "/etc/infusion-telemetry/gateway.toml"]
