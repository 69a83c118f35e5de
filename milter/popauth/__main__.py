import sys

from popauth.cli import main

sys.exit(main())
