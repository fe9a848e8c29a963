"""``python -m qdd.generation ARGS``: the same as ``qdd-cli generate ARGS``."""

import sys

from qdd.cli import main

if __name__ == "__main__":
    main(["generate", *sys.argv[1:]])
