"""The Docker backend's shared parts: the engine client (``engine``), images
(``images``), the run's network in mapped mode (``network``), labelled containers and
the orphan reaper (``containers``), and the backend itself (``backend``).

Only imported when the docker backend is chosen: a native run never imports the
Docker SDK or testcontainers (``pip install 'pytest-isolate-stacks[docker]'`` brings them).
"""
