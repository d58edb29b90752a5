from api.main import main

raise SystemExit(main())
