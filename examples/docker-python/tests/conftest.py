import os
import sys

import pytest

import isolate


@pytest.fixture(scope="session")
def isolate_migrations():
    return "migrations"  # relative to the rootdir (where pytest.ini is)


@pytest.fixture(scope="session")
def isolate_service_spec():
    return isolate.ServiceSpec(
        name="links",
        # docker backend: the image isolate builds from this directory (the rootdir)...
        build_context=".",
        # ...with ./Dockerfile; where there is no registry (isolate's own CI), the offline
        # form: LINKS_DOCKERFILE=offline.Dockerfile
        dockerfile=os.environ.get("LINKS_DOCKERFILE", "Dockerfile"),
        container_command=(),  # run the image's own CMD
        env={"HOST": "{host}", "PORT": "{port}", "DATABASE_URL": "{dsn}", "REDIS_URL": "{redis_url}"},
        health=isolate.HttpCheck("/health"),
        ready_timeout=60,  # a container's first start on a cold machine can be slow
        container_port=8000,  # port-mapped mode (Docker Desktop): its port in the container
        # the same service as a local process (native backend, or
        # --isolate-docker-services=native): no image needed
        command=[sys.executable, "-m", "links"],
    )
