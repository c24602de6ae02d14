"""``python -m isolate``: the command line (:mod:`isolate._cli`)."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
