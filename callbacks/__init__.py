"""Callbacks that do the algorithm work: one callback per file, re-exported here."""

__all__: list[str] = []
