"""Eviction policies: each scores tokens; the budgeted cache keeps the top ones."""
