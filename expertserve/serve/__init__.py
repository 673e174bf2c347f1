"""Serving: Ray Serve deployments around vLLM's AsyncLLM, with an OpenAI-compatible ingress."""
