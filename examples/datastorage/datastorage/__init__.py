"""datastorage: a small audit-event storage HTTP service.

Events are written to PostgreSQL; when PostgreSQL is unavailable they are
parked in a Redis list (the dead-letter queue) and drained back into
PostgreSQL in the background once it is reachable again.
"""

__version__ = "1.0.0"
