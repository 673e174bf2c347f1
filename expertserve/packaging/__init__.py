"""`.expert` packages: build, verify, install; Ed25519 signing."""
