from mailferry.starting import stop_while_starting

stop_while_starting()  # before the imports: a stop while starting is a clean stop

from api.main import main  # noqa: E402

raise SystemExit(main())
