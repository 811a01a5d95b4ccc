"""Memory QA benchmark: fictional knowledge, no memory vs BM25 retrieval vs MEMO."""
