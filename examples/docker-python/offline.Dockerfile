# The service's image, offline: no registry, no package index. The base image is built
# locally and already has the requirements (isolate's CI builds isolate-local/python:3
# from docker/python/Dockerfile: Debian's python3 with python3-starlette,
# python3-uvicorn, python3-psycopg and python3-redis, and tini as its entrypoint).
FROM isolate-local/python:3

WORKDIR /app
COPY links/ links/

USER nobody
CMD ["python3", "-m", "links"]
