"""`python -m convs2s ...` is the `convs2s` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
