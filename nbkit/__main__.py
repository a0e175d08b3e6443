from nbkit.cli import main

raise SystemExit(main())
