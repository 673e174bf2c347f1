"""Datasets of the shipped experts: generators (deterministic by seed) and objective scorers."""
