"""How much a request's numbers depend on its company: issue 18's table, and its causes.

The table: one seeded request (temperature 1, 48 tokens) on the default model, alone,
then among 31 other concurrent requests; then its tokens recomputed with
`compute_logprobs`. The causes: each suspect tried on its own, on random tensors of the
model's shapes, as "same bits or not" (and the largest difference when not):

- matmul rows: a projection's row computed alone, and among others in one call;
- decode attention: one query through the decode path (explicit, scores in the model's
  dtype) against the prefill path (SDPA) on the same keys;
- padding: one decode query alone, and in a group padded to a longer sequence;
- chunking: a prompt's last position, its prompt prefilled in one chunk or in two.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/measure_numerics.py [--dtypes float32 bfloat16]
        [--batch-invariant] [--device cuda]     (on CUDA: the table only, the Triton kernels')
"""

from __future__ import annotations

import argparse
import random

import torch

from engine import Engine, ModelInput, SamplingParams
from engine.layers.attention import AttentionMetadata, paged_attention, store_kv
from engine.models.default_model import fetch_default_model
from engine.models.loader import load_model
from engine.models.registry import load_model_config

NUM_TOKENS, NUM_OTHERS = 48, 31


def max_abs(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def table(dtype: torch.dtype, batch_invariant: bool, device: str = "cpu") -> dict[str, str]:
    """The issue's three rows for one dtype."""
    options = {"batch_invariant": True} if batch_invariant else {}
    engine = Engine(core="thread", device=device, dtype=dtype, progress=False, **options)
    client = engine.sampling_client()
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    prompt = ModelInput.from_ints(engine.tokenizer.encode("The best way to learn to cook is"))
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=1.0, seed=1234, stop=[],
                            ignore_eos=True)
    alone = client.sample(prompt, 1, params).result().sequences[0]
    others = [client.sample(ModelInput.from_ints([rng.randrange(100, vocab)
                                                  for _ in range(rng.randint(4, 200))]), 1,
                            SamplingParams(max_tokens=NUM_TOKENS, temperature=1.0, seed=i,
                                           ignore_eos=True)) for i in range(NUM_OTHERS // 2)]
    mine = client.sample(prompt, 1, params)
    others += [client.sample(ModelInput.from_ints([rng.randrange(100, vocab)
                                                   for _ in range(rng.randint(4, 200))]), 1,
                             SamplingParams(max_tokens=NUM_TOKENS, temperature=1.0, seed=i,
                                            ignore_eos=True))
               for i in range(NUM_OTHERS // 2, NUM_OTHERS)]
    batched = mine.result().sequences[0]
    for f in others:
        f.result()
    recomputed = client.compute_logprobs(
        ModelInput.from_ints(prompt.to_ints() + alone.tokens)).result()[prompt.length:]
    engine.shutdown()
    first = first_difference(alone.tokens, batched.tokens)
    same_lp = alone.logprobs == batched.logprobs
    return {
        "tokens alone vs in the batch": "equal" if first is None else f"differ from token {first} on",
        "logprobs alone vs in the batch (max abs)":
            "bitwise equal" if same_lp and first is None else
            f"{max_abs(alone.logprobs[:first], batched.logprobs[:first]):.2g}"
            + ("" if first is None else f" (before token {first})"),
        "sample-time vs recomputed logprobs (max abs)":
            "bitwise equal" if alone.logprobs == recomputed else
            f"{max_abs(alone.logprobs, recomputed):.2g}",
    }


def _verdict(a: torch.Tensor, b: torch.Tensor) -> str:
    if torch.equal(a, b):
        return "same bits"
    return f"differ (max abs {(a.float() - b.float()).abs().max().item():.2g})"


def matmul_rows(model, dtype: torch.dtype) -> str:
    """Layer 0's projections and the LM head of the model: 64 random rows each alone,
    then all in one call; then rows 0-1 as a call of two."""
    torch.manual_seed(0)
    layer = model.layers[0]
    linears = {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj,
               "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj,
               "lm_head": model.lm_head}
    found = []
    with torch.inference_mode():
        for name, linear in linears.items():
            x = torch.randn(64, linear.in_features).to(dtype)
            batched = linear(x)
            alone = torch.cat([linear(x[i:i + 1]) for i in range(64)])
            rows = (alone != batched).any(-1).sum().item()
            pair = torch.equal(linear(x[:2]), batched[:2])
            found.append(f"{name}: {rows}/64 rows differ alone vs in 64"
                         + ("" if pair else ", and 2 vs 64 rows differ"))
    return "; ".join(found)


def _one_sequence_cache(cfg, dtype, length: int, block_size: int = 16):
    """A KV cache holding one sequence of `length` random tokens in blocks 1, 2, ..."""
    heads, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    num_blocks = -(-length // block_size)
    cache = torch.zeros(2 * kvh, num_blocks + 1, block_size, d, dtype=dtype)
    kv = torch.randn(length, 2 * kvh, d).to(dtype)
    store_kv(cache, kv, torch.arange(block_size, block_size + length))
    table = list(range(1, num_blocks + 1))
    q = torch.randn(length, heads, d).to(dtype)
    return cache, table, q


def _meta(tables, context_lens, query_lens, block_size=16) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    num_decodes = sum(1 for n in query_lens if n == 1)
    return AttentionMetadata(torch.zeros(sum(query_lens), dtype=torch.int64), padded,
                             context_lens, query_lens, num_decodes, block_size)


def attention_probes(cfg, dtype: torch.dtype) -> dict[str, str]:
    torch.manual_seed(0)
    scale = cfg.head_dim ** -0.5
    length = 300
    cache, table, q = _one_sequence_cache(cfg, dtype, length)
    with torch.inference_mode():
        prefill = paged_attention(q, cache, _meta([table], [length], [length]), scale)
        decode = paged_attention(q[-1:], cache, _meta([table], [length], [1]), scale)
        # The same decode in a group with a sequence of 4000 tokens (its blocks are padding).
        long_cache, long_table, _ = _one_sequence_cache(cfg, dtype, 4000)
        offset = long_cache.shape[1]
        both = torch.cat((long_cache, cache), dim=1)
        tables = [[b + offset for b in table], long_table]
        padded = paged_attention(torch.cat((q[-1:], q[-1:])), both,
                                 _meta(tables, [length, 4000], [1, 1]), scale)[:1]
        first = paged_attention(q[:128], cache, _meta([table[:8]], [128], [128]), scale)
        second = paged_attention(q[128:], cache, _meta([table], [length], [length - 128]), scale)
    return {
        "decode path vs prefill path, same query": _verdict(decode[0], prefill[-1]),
        "decode alone vs padded to a 4000-token neighbour": _verdict(decode, padded),
        "prefill in one chunk vs two (last position)": _verdict(second[-1], prefill[-1]),
        "prefill in one chunk vs two (first chunk's last)": _verdict(first[-1], prefill[127]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch-invariant", action="store_true",
                        help="measure the table with the batch-invariant mode on")
    parser.add_argument("--no-probes", action="store_true", help="the table only")
    parser.add_argument("--device", default="cpu",
                        help="where the engine runs (the probes are the CPU's, run on cpu only)")
    args = parser.parse_args()
    model_dir = fetch_default_model()
    cfg = load_model_config(model_dir)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, batch_invariant="
          f"{args.batch_invariant}")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        for row, value in table(dtype, args.batch_invariant, args.device).items():
            print(f"{name:9s} {row:46s} {value}", flush=True)
        if args.no_probes or args.device != "cpu":
            continue
        model = load_model(model_dir, cfg, "cpu", dtype, progress=False)
        print(f"{name:9s} {'matmul rows':46s} {matmul_rows(model, dtype)}", flush=True)
        for row, value in attention_probes(cfg, dtype).items():
            print(f"{name:9s} {row:46s} {value}", flush=True)


if __name__ == "__main__":
    main()
