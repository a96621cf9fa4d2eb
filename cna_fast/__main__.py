"""`python -m cna_fast` runs the `cna` command."""
import sys

from .cli import main

sys.exit(main())
