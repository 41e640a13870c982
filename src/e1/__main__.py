from e1.cli import main

raise SystemExit(main())
