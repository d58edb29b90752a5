from mailferry.cli import main

raise SystemExit(main())
