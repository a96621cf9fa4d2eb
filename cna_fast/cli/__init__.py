"""The `cna` command (`python -m cna_fast` too): a thin layer over the library.

parser: the subcommands and their options; commands: one handler per subcommand (parse, call the
library, print); failures: the exit policy and the path checks before any work; plotting: figures.
"""
from .commands import main

__all__ = ["main"]
