"""`python -m cosyjax` -> the `cosyjax` command line (`cosyjax.cli`)."""
import sys

from cosyjax.cli import main

sys.exit(main())
