"""Developer tools outside the package: the free-threaded environment and its GIL check."""
