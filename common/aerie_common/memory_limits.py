"""Bounds on memory requests, part of the contract between the gateway (which asks within
them) and the memory service (which refuses a request beyond them with INVALID_ARGUMENT,
whoever sent it)."""

MAX_QUESTION_CHARS = 2000
MAX_ANSWER_TOKENS = 512  # a query's max_tokens
DEFAULT_DOCUMENTS_PAGE = 100  # documents a listing gives when the request names no limit
MAX_DOCUMENTS_PAGE = 1000
