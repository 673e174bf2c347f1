"""vLLM glue: prompt embeddings with soft prompts, sampling parameters, engine construction."""
