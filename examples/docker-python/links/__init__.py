"""links: a small link shortener (Starlette + uvicorn, PostgreSQL, Redis), the service of
the how-to "A Python service on the docker backend"."""
