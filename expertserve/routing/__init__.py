"""Routing: `model: "auto"` picks the expert (or the base model) from the request's messages."""
