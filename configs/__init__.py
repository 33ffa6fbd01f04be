"""Experiment configs: `base.py` holds every field's default; each experiment imports it and
overrides a few."""
