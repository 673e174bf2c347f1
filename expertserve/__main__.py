"""`python -m expertserve` is the `expertserve` command."""

import sys

from expertserve.cli.main import main

sys.exit(main())
