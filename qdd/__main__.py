"""``python -m qdd`` is ``qdd-cli`` (used by DDP launchers that re-run the command)."""

from qdd.cli import main

if __name__ == "__main__":
    main()
