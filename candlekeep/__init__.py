"""Candlekeep's shared core: instruments, ticks and bars, sources, storage, settings, the CLI.

api/, streaming/ and pipelines/ import this package; it imports none of them.
"""
