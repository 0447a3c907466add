"""pokeserve's serving core.

    from engine import Engine, ModelInput, SamplingParams
    engine = Engine()                          # the embedded default model on the CPU
    client = engine.sampling_client()
    resp = client.sample(ModelInput.from_ints(ids), 1, SamplingParams(max_tokens=16)).result()

The names below are imported on first use, so that the pure-Python parts (scheduler,
block manager) import without loading torch.
"""

import importlib

_EXPORTS = {
    "Engine": "engine.llm_engine", "EngineStats": "engine.outputs",
    "ModelInput": "engine.client", "SampleResponse": "engine.client",
    "SampledSequence": "engine.client", "SamplingClient": "engine.client",
    "RequestOutput": "engine.outputs", "RequestStream": "engine.outputs",
    "SamplingParams": "engine.sampling_params", "ReasoningOptions": "engine.text.pipeline",
    "ToolCallOptions": "engine.text.pipeline",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
