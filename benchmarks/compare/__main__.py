"""``python -m benchmarks.compare``: see `benchmarks.compare.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
