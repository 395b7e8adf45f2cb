"""`python -m vamba_hf ...` runs the `vamba-hf` command."""

import sys

from .cli import main

sys.exit(main())
