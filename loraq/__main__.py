"""`python -m loraq`: the same command line as the `loraq` script."""

from .cli import main

if __name__ == "__main__":  # not when a worker process (spawn) imports it
    main()
