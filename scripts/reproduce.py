"""Rerun published experiments (conf/experiment/paper/) over seeds and write a table of ours
beside the published numbers. Usage: see --help or the README's "Reproducing published results"."""

import sys

from medlite.reproduce.cli import main

if __name__ == "__main__":
    sys.exit(main())
