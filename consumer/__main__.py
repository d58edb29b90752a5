from consumer.main import main

raise SystemExit(main())
