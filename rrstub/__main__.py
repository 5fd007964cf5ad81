import sys

from rrstub.cli import main

sys.exit(main())
