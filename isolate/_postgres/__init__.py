"""PostgreSQL: the run's shared server, its facts (``server``) and its launchers
(``native``: initdb template + postgres processes; ``docker``: a container)."""

from .server import PostgresConfig, PostgresServer, prepare_database, tuned_settings

__all__ = ["PostgresConfig", "PostgresServer", "prepare_database", "tuned_settings"]
