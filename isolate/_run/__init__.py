"""A run's lifecycle: its dir and owner, the registry, liveness and reaping."""
