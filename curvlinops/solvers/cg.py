"""Placeholder: filled in by the matrix-free algorithms work (issue 3)."""

__all__: list[str] = []
