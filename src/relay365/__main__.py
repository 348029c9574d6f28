"""python -m relay365: the relay365 command line."""

from relay365.cli import main

main()
