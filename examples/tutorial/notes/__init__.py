"""notes: the tutorial's tiny service (stdlib HTTP server, PostgreSQL, Redis)."""
