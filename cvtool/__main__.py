"""`python -m cvtool` runs the command-line interface."""

from cvtool.cli import main

if __name__ == "__main__":
    main()
