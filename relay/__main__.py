import sys

from relay.main import main

sys.exit(main())
