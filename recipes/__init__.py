"""Runnable recipes: `python -m recipes.distill`, `python -m recipes.train`."""
