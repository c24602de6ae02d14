"""``python -m links``"""

from links.app import main

raise SystemExit(main())
