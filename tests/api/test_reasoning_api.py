"""Reasoning through the openai SDK: separate_reasoning, reasoning_effort and its budget.

The reasoning model is a checkpoint of the default model with a zero LoRA (so it is the
base model exactly) and the demo's Qwen3-style template, whose generation prompt opens
`<think>`; the contract's behaviours are also run with a DeepSeek-R1-style template,
which opens `<think>` too but never writes `</think>` itself, so that only what it
renders shows it is a reasoning template. The base model never learnt to close a trace:
asked to explain something, it writes on inside the trace until the length limit. That
makes the thinking budget show, and makes the end marker the engine forces the only
`</think>` in the output, at the position the contract gives (`ceil(effort * reasoning
budget)` tokens in), which the tests compute themselves. A second server checks the --reasoning-* options.
"""

from __future__ import annotations

import math
import shutil
from fractions import Fraction
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from api.chat import _Chat
from api.cli import build_parser
from api.generation import Generation
from api.metrics import Metrics
from api.protocol import ChatCompletionRequest
from api.state import ServerConfig
from engine import RequestOutput, SamplingParams
from scripts.make_demo_checkpoints import parse_args as demo_args
from tests.api.conftest import API_KEY, MODEL, OneOutputEngine, running_server
from tests.engine.checkpoints.helpers import save_peft_adapter
from tests.engine.text.test_reasoning import R1_STYLE_TEMPLATE

pytestmark = pytest.mark.model

DEMO_TEMPLATE = Path(__file__).resolve().parents[2] / "scripts" / "demo_chat_template.jinja"
RUN = "reasoning-test:train:0"
FORCED_END = "\n</think>\n\n"   # how the demo template itself closes a trace (the contract)
QUESTION = [{"role": "user", "content": "Explain how photosynthesis works."}]
MAX_TOKENS = 40
EFFORTS = {"minimal": 0.01, "low": 0.3, "medium": 0.6, "high": 0.9}   # the contract's
CHECKPOINT = Path(RUN, "sampler_weights", "000001")
TEMPLATES = {"qwen3-style": (CHECKPOINT, DEMO_TEMPLATE.read_text()),
             "r1-style": (CHECKPOINT.with_name("000002"), R1_STYLE_TEMPLATE)}
# The contract's reasoning behaviours, asked of both template styles.
BOTH_STYLES = pytest.mark.parametrize("reasoning_model", list(TEMPLATES), indirect=True)
SERVER_BUDGET = 10


@pytest.fixture(scope="module")
def reasoning_model(request, server, default_model_dir) -> str:
    """A complete checkpoint, written after the server started: zero LoRA and the demo's
    template, or the template style a test names as its parameter."""
    checkpoint, template = TEMPLATES[getattr(request, "param", "qwen3-style")]
    path = server.checkpoint_root / checkpoint
    if not path.exists():   # the default style is also asked for by name
        path.mkdir(parents=True)
        (path / "chat_template.jinja").write_text(template)
        save_peft_adapter(default_model_dir, path, r=1, std=0.0)   # checkpoint_complete last
    return f"tinker://{checkpoint.as_posix()}"


@pytest.fixture(scope="module")
def configured_server(server, reasoning_model, default_model_dir, tmp_path_factory):
    """A second server started with --reasoning-parser and --reasoning-budget, holding
    the same reasoning checkpoint."""
    options = ("--reasoning-parser", "qwen3", "--reasoning-budget", str(SERVER_BUDGET))
    with running_server(default_model_dir, tmp_path_factory.mktemp("configured-server"),
                        *options) as srv:
        shutil.copytree(server.checkpoint_root / RUN, srv.checkpoint_root / RUN)
        yield srv


@pytest.fixture(scope="module")
def configured_client(configured_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=configured_server.v1, api_key=API_KEY, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def forced_end_tokens(default_model_dir) -> int:
    hf = AutoTokenizer.from_pretrained(default_model_dir)
    return len(hf.encode(FORCED_END, add_special_tokens=False))


def chat(client, model, **kwargs):
    return client.chat.completions.create(**{
        "model": model, "messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0,
        **kwargs})


def budget(effort: float, limit: int = MAX_TOKENS) -> int:
    """The contract's thinking budget, on the effort as written (0.3 is 3/10)."""
    return math.ceil(Fraction(str(effort)) * limit)


def tokens(response) -> list[str]:
    return [entry.token for entry in response.choices[0].logprobs.content]


def assert_forced_end_at(resp, position: int, forced_end_tokens: int) -> None:
    """The first `position` tokens were sampled, with no end marker; the forced one follows."""
    out = tokens(resp)
    assert "</think>" not in "".join(out[:position])
    assert "".join(out[position:position + forced_end_tokens]) == FORCED_END


@BOTH_STYLES
def test_trace_and_answer_go_to_separate_fields(client, reasoning_model) -> None:
    message = chat(client, reasoning_model, reasoning_effort="low").choices[0].message
    assert message.reasoning_content and message.content
    assert message.reasoning == message.reasoning_content     # vLLM's newer name, mirrored
    for text in (message.reasoning_content, message.content):
        assert "<think>" not in text and "</think>" not in text


@BOTH_STYLES
def test_separate_reasoning_false_keeps_the_trace_inline(client, reasoning_model) -> None:
    split = chat(client, reasoning_model, reasoning_effort="low")
    inline = chat(client, reasoning_model, reasoning_effort="low",
                  extra_body={"separate_reasoning": False})
    assert inline.choices[0].message.reasoning_content is None
    assert inline.usage.completion_tokens_details.reasoning_tokens == \
        split.usage.completion_tokens_details.reasoning_tokens   # the trace still counts
    trace, answer = inline.choices[0].message.content.split("</think>")
    assert trace.strip("\n") == split.choices[0].message.reasoning_content
    assert answer.lstrip("\n") == split.choices[0].message.content


@BOTH_STYLES
def test_a_trace_cut_off_by_max_tokens_is_all_reasoning(client, reasoning_model) -> None:
    resp = chat(client, reasoning_model, max_tokens=8)
    message = resp.choices[0].message
    assert resp.choices[0].finish_reason == "length"
    assert message.reasoning_content and not message.content
    assert resp.usage.completion_tokens_details.reasoning_tokens == 8


@BOTH_STYLES
def test_stream_sends_the_trace_before_the_answer_and_joins_to_the_message(
        client, reasoning_model) -> None:
    full = chat(client, reasoning_model, reasoning_effort="medium")
    chunks = list(chat(client, reasoning_model, reasoning_effort="medium", stream=True,
                       stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    kinds = [("reasoning" if getattr(d, "reasoning_content", None) else "")
             + ("content" if d.content else "") for d in deltas]
    assert "reasoningcontent" not in kinds                     # no chunk mixes the two
    assert kinds.index("content") > max(i for i, k in enumerate(kinds) if k == "reasoning")
    assert all(getattr(d, "reasoning", None) == getattr(d, "reasoning_content", None)
               for d in deltas)
    message = full.choices[0].message
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == \
        message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == message.content
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == \
        full.usage.completion_tokens_details.reasoning_tokens


@pytest.mark.parametrize("reasoning_model, effort", [
    *(("qwen3-style", effort) for effort in ["minimal", "low", "medium", "high", 0.5, 0.0]),
    ("r1-style", "low")], indirect=["reasoning_model"])
def test_effort_spends_its_budget_then_forces_the_end_marker(
        client, reasoning_model, forced_end_tokens, effort) -> None:
    # Room for the answer after the budget of "high", 0.9 of the token limit.
    resp = chat(client, reasoning_model, logprobs=True, max_tokens=100,
                extra_body={"reasoning_effort": effort})
    allowed = budget(EFFORTS.get(effort, effort), 100)
    assert_forced_end_at(resp, allowed, forced_end_tokens)
    assert resp.choices[0].message.content                      # and an answer follows
    reasoning_tokens = resp.usage.completion_tokens_details.reasoning_tokens
    assert allowed < reasoning_tokens <= allowed + forced_end_tokens   # through `</think>`


def test_higher_effort_never_yields_fewer_reasoning_tokens(client, reasoning_model) -> None:
    counts = [chat(client, reasoning_model, reasoning_effort=effort)
              .usage.completion_tokens_details.reasoning_tokens for effort in EFFORTS]
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_reasoning_budget_is_the_requests_token_limit(client, reasoning_model,
                                                      forced_end_tokens) -> None:
    resp = chat(client, reasoning_model, logprobs=True, reasoning_effort="low",
                max_completion_tokens=20)   # wins over max_tokens, as for the length limit
    assert_forced_end_at(resp, budget(0.3, 20), forced_end_tokens)


def test_reasoning_budget_without_a_token_limit_is_the_context_left(
        client, reasoning_model, forced_end_tokens) -> None:
    # No max_tokens: stop at the forced marker, or the base model would write to 2048.
    # Stop strings apply to the answer; with the trace inline it is part of the answer.
    resp = chat(client, reasoning_model, logprobs=True, reasoning_effort="minimal",
                max_tokens=None, stop=["</think>"],
                extra_body={"include_stop_str_in_output": True, "separate_reasoning": False})
    allowed = budget(0.01, 2048 - resp.usage.prompt_tokens)   # the server's --max-model-len
    out = tokens(resp)
    assert "</think>" not in "".join(out[:allowed])
    forced = "".join(out[allowed:])   # the forced marker, up to the stop string
    assert forced.startswith("\n</think>") and FORCED_END.startswith(forced)


def test_enable_thinking_false_gets_no_trace_and_no_budget(client, reasoning_model) -> None:
    resp = chat(client, reasoning_model, reasoning_effort="high",
                extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    message = resp.choices[0].message
    assert message.reasoning_content is None and message.content
    assert resp.usage.completion_tokens_details.reasoning_tokens == 0


def test_separate_reasoning_is_a_no_op_without_a_reasoning_format(client) -> None:
    split, inline = (chat(client, MODEL, extra_body={"separate_reasoning": flag})
                     for flag in (True, False))
    assert split.choices[0].message.content == inline.choices[0].message.content
    assert split.choices[0].message.reasoning_content is None
    assert split.usage.completion_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize("effort", ["extreme", 1.5, -0.1, True, ["low"]])
def test_bad_effort_is_a_400_naming_the_allowed_values(client, reasoning_model, effort) -> None:
    with pytest.raises(openai.BadRequestError, match="'minimal', 'low', 'medium', 'high'") \
            as info:
        chat(client, reasoning_model, extra_body={"reasoning_effort": effort})
    assert info.value.body["param"] == "reasoning_effort"


def test_effort_on_a_model_without_reasoning_is_a_400(client) -> None:
    with pytest.raises(openai.BadRequestError, match="does not support reasoning_effort"):
        chat(client, MODEL, reasoning_effort="low")


def test_effort_on_completions_is_a_400(client, reasoning_model) -> None:
    with pytest.raises(openai.BadRequestError, match="reasoning_effort") as info:
        client.completions.create(model=reasoning_model, prompt="7 + 5 =", max_tokens=4,
                                  extra_body={"reasoning_effort": "low"})
    assert info.value.body["param"] == "reasoning_effort"


def test_server_reasoning_budget_replaces_the_token_limit(
        configured_client, reasoning_model, forced_end_tokens) -> None:
    resp = chat(configured_client, reasoning_model, logprobs=True, reasoning_effort="high")
    assert_forced_end_at(resp, budget(0.9, SERVER_BUDGET), forced_end_tokens)


def test_server_reasoning_parser_gives_every_model_a_reasoning_format(configured_client) -> None:
    # The base template opens no trace and the model writes none: all of it is answer.
    resp = chat(configured_client, MODEL, reasoning_effort="low")
    assert resp.choices[0].message.content and resp.choices[0].message.reasoning_content is None


def test_unknown_reasoning_parser_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="qwen3"):
        ServerConfig(reasoning_parser="nope")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--reasoning-parser", "nope"])


def test_server_and_demo_script_share_the_default_checkpoint_root(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("POKESERVE_HOME", str(tmp_path))
    served = build_parser().parse_args(["serve"]).checkpoint_root
    assert served == demo_args(["--model-dir", str(tmp_path)]).checkpoint_root
    assert Path(served) == tmp_path / "checkpoints"


def test_reasoning_and_content_released_together_go_out_as_two_chunks() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": QUESTION, "stream": True,
        "stream_options": {"include_usage": True}})
    out = RequestOutput("r-0", token_ids=[1, 2, 3], text="So 12.</think>\n\n12.",
                        reasoning="So 12.", content="12.", reasoning_tokens=3,
                        finished=True, finish_reason="stop")
    gen = Generation(OneOutputEngine(out), Metrics(), lambda: False)
    gen.submit([[1]], SamplingParams(), 1, None)
    chunks = list(_Chat(req, gen, None).chunks())
    body = [c["choices"][0] for c in chunks[1:-1]]   # after the role chunk, before usage
    assert [c["delta"] for c in body] == [{"reasoning_content": "So 12.", "reasoning": "So 12."},
                                          {"content": "12."}]
    assert [c["finish_reason"] for c in body] == [None, "stop"]
    assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3
