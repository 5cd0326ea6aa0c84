"""Sweeps: what happens after a multirun (summarising jobs, aggregating seeds, picking a model).

Submodules are imported where needed, so a Hydra callback can load one without the others.
"""
