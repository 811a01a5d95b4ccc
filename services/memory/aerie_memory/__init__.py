"""The memory service: learns documents into a small MEMORY model (MEMO) and answers from it."""
