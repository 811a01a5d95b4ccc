"""Bounds on a memory query, part of the contract between the gateway (which asks within
them) and the memory service (which refuses a question beyond them with INVALID_ARGUMENT,
whoever sent it)."""

MAX_QUESTION_CHARS = 2000
MAX_ANSWER_TOKENS = 512  # a query's max_tokens
