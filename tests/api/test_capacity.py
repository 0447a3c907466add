"""Over capacity: with --max-queued-requests, a request that would wait behind that many
others gets a 429 in the OpenAI shape, and the server goes on serving."""

from __future__ import annotations

import re
import threading
import time

import openai
import pytest
import requests

from tests.api.conftest import API_KEY, running_server

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def busy_server(default_model_dir, tmp_path_factory):
    # One sequence at a time: a second request waits, a third is over capacity.
    with running_server(default_model_dir, tmp_path_factory.mktemp("busy"),
                        "--max-num-seqs", "1", "--max-queued-requests", "1") as srv:
        yield srv


def gauge(server, name: str) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_request_past_the_queue_limit_gets_429_and_the_server_keeps_serving(busy_server):
    client = openai.OpenAI(base_url=f"{busy_server.url}/v1", api_key=API_KEY, max_retries=0)
    model = client.models.list().data[0].id
    results = []

    def long_request() -> None:
        results.append(client.completions.create(model=model, prompt="hello", max_tokens=200,
                                                 extra_body={"ignore_eos": True}))

    others = [threading.Thread(target=long_request) for _ in range(2)]
    others[0].start()
    wait_for(lambda: gauge(busy_server, "pokeserve_num_requests_running") == 1)
    others[1].start()
    wait_for(lambda: gauge(busy_server, "pokeserve_num_requests_waiting") == 1)
    with pytest.raises(openai.RateLimitError, match="over capacity"):
        client.completions.create(model=model, prompt="hello", max_tokens=2)
    for t in others:
        t.join(timeout=300)
    assert [r.usage.completion_tokens for r in results] == [200, 200]
    after = client.completions.create(model=model, prompt="hello", max_tokens=2)
    assert after.usage.completion_tokens == 2
