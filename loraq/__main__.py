"""`python -m loraq`: the same command line as the `loraq` script."""

from .cli import main

main()
