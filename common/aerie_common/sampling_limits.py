"""Bounds on a request's sampling fields, part of the contract between the gateway (which
answers a request beyond them with a 400 naming the field) and the verifier (which
refuses one with INVALID_ARGUMENT, whoever sent it)."""

MAX_STOP_STRINGS = 4
# The verifier holds back any tail of the output that could still become a stop string,
# checking every prefix of every stop string at every token: long ones cost time per token.
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
# OpenAI's: at most 20 alternatives per token, penalties within [-2, 2], biases within
# [-100, 100], of at most 300 tokens.
MAX_TOP_LOGPROBS = 20
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 300
