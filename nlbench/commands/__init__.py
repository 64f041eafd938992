"""CLI sub-commands, one module each (see nlbench/cli.py)."""
