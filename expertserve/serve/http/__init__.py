"""HTTP concerns of the ingress: authentication (middleware), body reading, response headers and the mapping of
errors to OpenAI error bodies. Nothing here knows about experts or engines."""
