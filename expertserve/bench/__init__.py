"""`expertserve bench`: expertserve side by side with vLLM's own OpenAI server, reported as ratios."""
