from chtsync.cli import main

raise SystemExit(main())
