"""What one HTTP request may ask for: the bounds a server under shared use needs.

Each is a 4xx in the OpenAI error shape naming the field (README's API section lists
them). They are the HTTP layer's own policy; the ranges of the sampling parameters
themselves (temperature, top_p, penalties, seed, ...) are `SamplingParams`' rules, and
token ids are bounded by the engine against the model's vocabulary.
"""

from __future__ import annotations

MAX_BODY_BYTES = 8 << 20   # a larger body is a 413, refused before it is read
MAX_JSON_DEPTH = 64        # arrays and objects inside each other
MAX_PROMPTS = 256          # prompts in one /v1/completions request
MAX_N = 128                # samples per prompt
MAX_CHOICES = 1024         # prompts x n: the sequences one request queues
MAX_MESSAGES = 1024        # chat messages, on /v1/chat/completions and /tokenize
MAX_TOOLS = 128            # as in the OpenAI API
MAX_STOP_STRINGS = 32      # each checked against every new piece of text
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024      # entries
MAX_LOGPROBS = 20          # alternatives per token, as in the OpenAI API

BODY_TOO_LARGE = (f"the request body is larger than the limit of {MAX_BODY_BYTES >> 20} MiB "
                  f"({MAX_BODY_BYTES} bytes)")
