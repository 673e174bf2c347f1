"""expertserve: train and serve many small experts on one base LLM."""

__version__ = "0.1.0"
