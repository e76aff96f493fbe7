# poller's image: the package installed from this checkout into a virtualenv, the example
# handlers in /app/handlers, `poller run` as the entrypoint.
#   docker build -t registry.example.com/team/poller:0.1.0 .
# Your own handlers: build FROM this image, COPY them to /app/handlers/ (config.toml's
# code_path) and precompile them as below. deploy/kubernetes runs it.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/poller
WORKDIR /src
COPY pyproject.toml README.md ./
COPY poller ./poller
# Not editable: the runtime stage copies the virtualenv alone, without /src.
RUN /opt/poller/bin/pip install .

FROM python:${PYTHON_VERSION}-slim-bookworm
# tini as PID 1 reaps processes that handlers start and leave behind (the daemon reaps only its
# own workers) and passes SIGTERM on to the daemon, which drains.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 poller \
    && useradd --system --uid 10001 --gid poller --home-dir /var/lib/poller --no-create-home \
        --shell /usr/sbin/nologin poller
COPY --from=build /opt/poller /opt/poller
COPY handlers /app/handlers
# The root filesystem is read-only in deploy/kubernetes: compile now, or every new execution
# environment compiles its handler again.
RUN python -m compileall -q /app /opt/poller
ENV PATH=/opt/poller/bin:$PATH PYTHONDONTWRITEBYTECODE=1
# Numeric, so that Kubernetes can check runAsNonRoot (deployment.yaml runs as the same ids).
USER 10001:10001
WORKDIR /var/lib/poller
EXPOSE 9102
ENTRYPOINT ["/usr/bin/tini", "--", "poller", "run"]
CMD ["--config", "/etc/poller/config.toml"]
