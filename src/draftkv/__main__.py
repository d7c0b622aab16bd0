"""`python -m draftkv` runs the command line."""

from .cli import run

run()
