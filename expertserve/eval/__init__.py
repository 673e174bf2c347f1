"""Evaluation: base model against expert on the held-out test split, with objective scorers."""
