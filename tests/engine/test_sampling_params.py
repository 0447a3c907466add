"""SamplingParams' ranges, those of the OpenAI reference and vLLM: each bad value is a
ValueError naming its field, and the edges of each range are accepted. (Token ids are
the engine's to bound: tests/engine/test_engine.py.)"""

from __future__ import annotations

import math

import pytest

from engine import SamplingParams

INF, NAN = math.inf, math.nan


@pytest.mark.parametrize("bad", [
    dict(temperature=2.0001), dict(temperature=INF), dict(temperature=NAN),
    dict(top_p=NAN), dict(top_p=INF), dict(min_p=NAN),
    dict(top_k=2**31), dict(top_k=-2),
    dict(presence_penalty=2.5), dict(presence_penalty=-INF), dict(frequency_penalty=NAN),
    dict(repetition_penalty=0.0), dict(repetition_penalty=INF), dict(repetition_penalty=NAN),
    dict(repetition_penalty=-1.0),
    dict(seed=2**63), dict(seed=-2**63 - 1), dict(seed=10**29),
    dict(logit_bias={5: INF}), dict(logit_bias={5: NAN}), dict(logit_bias={5: -100.5}),
])
def test_out_of_range_and_non_finite_values_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


@pytest.mark.parametrize("edge", [
    dict(temperature=0.0), dict(temperature=2.0), dict(top_p=1.0), dict(top_k=2**31 - 1),
    dict(top_k=-1), dict(presence_penalty=-2.0), dict(frequency_penalty=2.0),
    dict(repetition_penalty=1e-3), dict(repetition_penalty=50.0),
    dict(seed=2**63 - 1), dict(seed=-2**63), dict(logit_bias={5: -100.0, 6: 100.0}),
])
def test_the_edges_of_each_range_are_accepted(edge):
    params = SamplingParams(**edge)
    assert all(getattr(params, name) == value for name, value in edge.items())


def test_a_huge_value_is_shown_shortened_in_the_message():
    with pytest.raises(ValueError) as info:
        SamplingParams(logit_bias={i: 500.0 for i in range(1000)})
    assert len(str(info.value)) < 200
