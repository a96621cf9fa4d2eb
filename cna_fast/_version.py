"""The version of cna_fast, written once: the package and pyproject.toml read it from here."""
__version__ = "0.1.0"
