"""``python -m quotientsharp measure ...``: the command line of :mod:`quotientsharp.cli`."""
from quotientsharp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
