"""Base models: the offline SmolLM2 conversion and tiny random models for tests."""
