"""Bounds on a request's sampling fields, part of the contract between the gateway (which
answers a request beyond them with a 400 naming the field) and the verifier (which
refuses one with INVALID_ARGUMENT, whoever sent it); and the sampling fields a served
model may set defaults for."""

from __future__ import annotations

import math
from typing import Literal, get_args

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

# The sampling fields a served model may recommend defaults for (its generation_config.json,
# as vLLM and SGLang read it): requests that leave them out are decoded with those
# (ModelInfo.sampling_defaults).
SamplingDefaultField = Literal["temperature", "top_p", "top_k", "min_p", "repetition_penalty"]
SAMPLING_DEFAULT_FIELDS: tuple[str, ...] = get_args(SamplingDefaultField)
# Each one's range, for a finite value: whether a value is in it, and how to say it
_RANGES = {
    "temperature": (lambda value: value >= 0, "a finite number >= 0"),
    "top_p": (lambda value: 0 < value <= 1, "in (0, 1]"),
    "top_k": (lambda value: value >= 0 and value == int(value), "an integer >= 0"),
    "min_p": (lambda value: 0 <= value <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda value: value > 0, "a finite number > 0"),
}


def check_sampling_value(field: SamplingDefaultField, value: float) -> None:
    """ValueError naming ``field`` and its range unless a request may hold ``value`` there."""
    in_range, described = _RANGES[field]
    if not (math.isfinite(value) and in_range(value)):
        raise ValueError(f"{field} must be {described}, got {value}")


def check_sampling_defaults(defaults: dict[str, float]) -> dict[str, float]:
    """``defaults`` (a field of SAMPLING_DEFAULT_FIELDS -> its value), top_k made an int, if
    a request may hold each value; else ValueError naming it."""
    checked = dict(defaults)
    for field, value in defaults.items():
        check_sampling_value(field, value)
        if field == "top_k":
            checked[field] = int(value)
    return checked
