"""`python -m chtsync` and the `chtsync` script."""

from __future__ import annotations

import sys


def run() -> int:
    try:
        from chtsync.cli import main

        return main()
    except KeyboardInterrupt:  # Ctrl-C while the command line and its commands load: no traceback
        return 130


if __name__ == "__main__":
    sys.exit(run())
