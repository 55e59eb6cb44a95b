"""Entry point of `rbee-hive`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run `rbee-hive`; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    print("usage: rbee-hive [--help] (not built yet)", file=sys.stderr)
    return 0 if argv in ([], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
