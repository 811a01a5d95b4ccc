"""The verifier service: holds the target LLM and generates (later: verifies draft trees)."""
