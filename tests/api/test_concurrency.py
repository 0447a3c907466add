"""Many clients at once: 32 concurrent streams, some hanging up half-way. The others get
their full, correct text; the hung-up sequences are aborted and free their KV blocks."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.api.conftest import MODEL

pytestmark = pytest.mark.model

# Prompts whose greedy continuation is confident, so batching cannot flip a token.
PROMPTS = ["Count with me: one, two, three,", "1, 2, 3, 4, 5, 6,", "a, b, c, d, e,",
           "Monday, Tuesday, Wednesday,"]
NUM_CLIENTS = 32
HANGS_UP = set(range(3, NUM_CLIENTS, 4))   # 8 clients leave after two chunks
LONG = 1500                                 # what a hung-up client asked for


def stream_text(client, prompt: str, max_tokens: int, hang_up: bool) -> str | None:
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    parts = []
    for chunk in stream:
        parts.append(chunk.choices[0].text)
        if hang_up and len(parts) == 2:
            stream.close()
            return None
    return "".join(parts)


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


def test_concurrent_streams_with_disconnects(client, server) -> None:
    expected = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text
                for p in PROMPTS}
    total_blocks = server.metric("pokeserve_kv_cache_blocks_total")

    def run(i: int) -> str | None:
        hang_up = i in HANGS_UP
        return stream_text(client, PROMPTS[i % len(PROMPTS)], LONG if hang_up else 12, hang_up)

    with ThreadPoolExecutor(NUM_CLIENTS) as pool:
        results = list(pool.map(run, range(NUM_CLIENTS)))

    for i, text in enumerate(results):
        if i not in HANGS_UP:
            assert text == expected[PROMPTS[i % len(PROMPTS)]], f"client {i}"
    assert requests.get(f"{server.url}/health").status_code == 200
    # The hung-up sequences wanted 1500 tokens each: only an abort frees them this soon.
    assert wait_for(lambda: server.metric("pokeserve_num_requests_running") == 0, 20)
    assert server.metric("pokeserve_kv_cache_blocks_used") == 0
    assert server.metric("pokeserve_kv_cache_blocks_total") == total_blocks
