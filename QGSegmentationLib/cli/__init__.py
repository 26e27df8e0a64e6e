"""The `qgseg` command line. `main.py` builds the parser; one file per command group."""
