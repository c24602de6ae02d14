"""inventory: the SQLAlchemy + Alembic recipe's service."""
