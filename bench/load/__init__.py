"""Load test of the gateway: `python -m bench.load` (see bench/load/__main__.py)."""
