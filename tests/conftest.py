"""Shared pytest setup (the repository root is importable through pyproject's ``pythonpath``)."""
