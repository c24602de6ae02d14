"""Entry point: ``python -m datastorage``."""

from datastorage.server import main

raise SystemExit(main())
