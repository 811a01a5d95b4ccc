"""Aerie's HTTP gateway: an OpenAI-compatible API in front of the verifier's gRPC service."""
