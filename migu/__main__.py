"""`python -m migu ...` == the `migu` script."""

import sys

from migu.cli import main

sys.exit(main())
