"""Analyses the passes share, below them in the layering: budget allocation (allocate.py)."""
