# The service's image: `python -m svc`, configured only through the environment (see README,
# "Settings"). docker-compose.yaml builds it for the `app` profile's orders and notify.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Only what `pip install` needs; the sources are removed once installed.
COPY pyproject.toml README.md /src/
COPY svc /src/svc
COPY example1 /src/example1
RUN pip install /src \
    && rm -rf /src \
    && useradd --create-home --uid 10001 --user-group svc

# Not root (10001 is the svc user made above; numeric, so a runtime can check it is not 0).
# The working directory holds no .env: every setting comes from the container's environment.
USER 10001:10001
WORKDIR /home/svc

# python is PID 1: the service handles SIGTERM itself (finishes and acks the batch in hand,
# then exits 0), so `docker stop` is a graceful stop.
CMD ["python", "-m", "svc"]
