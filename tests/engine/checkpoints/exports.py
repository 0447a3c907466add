"""Export test helpers: an exported directory read back by transformers alone, against
pokeserve serving the checkpoint it was exported from."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine import Engine, ModelInput, SamplingParams
from tests.engine.checkpoints.helpers import PROMPT, LogprobsFn, greedy

NEW_TOKENS = 12


def hub_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def transformers_logprobs_fn(model_dir: Path) -> LogprobsFn:
    """transformers alone over an exported directory, in float32, as the class its
    config.json names (what AutoModelForCausalLM picks for a text model; a vision-language
    export loads whole, its tower included). Every tensor written is one transformers
    reads, and none it reads is missing (it would fill it with random values)."""
    import transformers

    architecture = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    model, info = getattr(transformers, architecture).from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()

    @torch.no_grad()
    def logprobs(ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return logprobs


def served_greedy(base: Path, root: Path, checkpoint: str, prompt: list[int],
                  num_tokens: int = NEW_TOKENS) -> tuple[list[int], list[float]]:
    """pokeserve serving `checkpoint` (under `root`) over `base`: greedy tokens, and the
    logprob of each."""
    eng = Engine(base, block_size=4, num_kv_blocks=64, checkpoint_root=str(root), progress=False)
    try:
        seq = eng.sampling_client(checkpoint).sample(
            ModelInput.from_ints(prompt), 1,
            SamplingParams(max_tokens=num_tokens, temperature=0.0, stop=[])
        ).result(timeout=60).sequences[0]
    finally:
        eng.shutdown()
    return seq.tokens, seq.logprobs


def assert_export_serves_like_the_checkpoint(out: Path, base: Path, root: Path, checkpoint: str,
                                             prompt: list[int] = PROMPT) -> list[int]:
    """transformers over the export `out`: the greedy tokens pokeserve serves for
    `checkpoint` (returned), and their logprobs within 1e-4."""
    tokens, logprobs = served_greedy(base, root, checkpoint, prompt)
    exported = transformers_logprobs_fn(out)
    assert greedy(exported, prompt, len(tokens)) == tokens
    ids = torch.tensor(tokens)[:, None]
    rows = exported(prompt + tokens)[len(prompt) - 1:-1].gather(1, ids)[:, 0]   # [num_tokens]
    torch.testing.assert_close(torch.tensor(logprobs), rows, atol=1e-4, rtol=0)
    return tokens
