"""Alembic's environment: migrations run on the connection the caller hands over in
``config.attributes["connection"]`` (isolate's, in the tests), or on DATABASE_URL."""

import os

from alembic import context
from inventory.models import Base
from sqlalchemy import create_engine

connection = context.config.attributes.get("connection")
if connection is None:
    url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
    connection = create_engine(url).connect()
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
