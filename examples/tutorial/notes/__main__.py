"""``python -m notes``"""

from notes.app import main

raise SystemExit(main())
