from inventory.server import main

raise SystemExit(main())
