"""Decode cost per token of a hybrid (Qwen3.5) model against an all-attention one, as the
context grows.

    .venv/bin/python scripts/bench_hybrid_decode.py [--contexts 256 1024 4096] [--batch 8]
        [--prefill-contexts 256 1024] [--batch-invariant]

Two random models of one shape (Qwen3.5-9B's proportions at a quarter of its width): the
hybrid with Qwen3.5's 3:1 layout of Gated DeltaNet and gated attention, and the same
model with every layer gated attention. Each decode step runs `--batch` sequences of the
given context; the KV cache and the states are filled with random values instead of a
prefill (a step's cost does not depend on them). A step is timed whole (the model
forward, without the head), and the token mixers of each kind are timed by hooks around
them. Median over `--iters` steps after two warm-up steps.

Expected: the linear-attention layers' cost is flat in the context (a fixed-size state),
the attention layers' grows with it (they read every cached key and value).

Then one prompt's prefill per `--prefill-contexts` length: what a prefix-cache hit of that
length saves (for the hybrid, from a state kept at a block boundary: engine.state_snapshots;
scripts/bench_hybrid_prefix.py measures it through the engine).

`--batch-invariant` adds the hybrid in the batch-invariant mode (engine.layers.
batch_invariant), whose linear-attention layers run the recurrent form for every token,
a prompt's too: what that costs a prefill (and a decode) against the chunked form.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from engine.layers.attention import AttentionMetadata
from engine.layers.batch_invariant import enable
from engine.layers.linear_attention import StateSlotMetadata
from engine.model_runner import allocate_kv_caches
from engine.models.qwen3_5 import Qwen3_5Config, Qwen3_5ForCausalLM

BLOCK = 16
SHAPE = dict(model_type="qwen3_5_text", vocab_size=1024, hidden_size=1024,
             intermediate_size=3072, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=1, head_dim=256, linear_num_key_heads=4,
             linear_num_value_heads=8, linear_key_head_dim=128, linear_value_head_dim=128,
             max_position_embeddings=8192, rope_parameters={"rope_theta": 1e7})


def build(all_attention: bool, dtype: torch.dtype) -> Qwen3_5ForCausalLM:
    layers = SHAPE["num_hidden_layers"]
    layer_types = ["full_attention" if all_attention or (i + 1) % 4 == 0 else "linear_attention"
                   for i in range(layers)]
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(Qwen3_5Config.from_dict({**SHAPE, "layer_types": layer_types}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p).log() if name.endswith("A_log") else
                    torch.randn_like(p) * 0.02)
    return model.to(dtype).eval()


def decode_inputs(model, batch: int, context: int, dtype: torch.dtype,
                  device: str | torch.device = "cpu"):
    """A step of `batch` decodes, each at position `context - 1` of its own blocks."""
    cfg = model.cfg
    blocks_per_seq = -(-context // BLOCK)
    caches = allocate_kv_caches(cfg, batch * blocks_per_seq, BLOCK, dtype, device, batch)
    for cache in caches:
        for t in ([cache] if isinstance(cache, torch.Tensor) else [cache.conv, cache.recurrent]):
            t.normal_(0.0, 0.5)
    tables = torch.arange(batch * blocks_per_seq, device=device).view(batch, blocks_per_seq)
    last = context - 1
    state_slots = (StateSlotMetadata.build(list(range(batch)), [False] * batch, batch, device)
                   if cfg.linear_attention else None)
    meta = AttentionMetadata(
        slot_mapping=tables[:, last // BLOCK] * BLOCK + last % BLOCK, block_tables=tables,
        context_lens=[context] * batch, query_lens=[1] * batch, num_decodes=batch,
        block_size=BLOCK, state_slots=state_slots)
    ids = torch.randint(0, cfg.vocab_size, (batch,), device=device)
    return ids, torch.full((batch,), last, device=device), caches, meta


def prefill_inputs(model, context: int, dtype: torch.dtype):
    """One fresh prompt of `context` tokens, prefilled in one step."""
    cfg = model.cfg
    blocks = -(-context // BLOCK)
    caches = allocate_kv_caches(cfg, blocks, BLOCK, dtype, "cpu", 1)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(context), block_tables=torch.arange(blocks)[None],
        context_lens=[context], query_lens=[context], num_decodes=0, block_size=BLOCK,
        state_slots=StateSlotMetadata.build([0], [True], 0, "cpu"))
    return torch.randint(0, cfg.vocab_size, (context,)), torch.arange(context), caches, meta


def time_mixers(model) -> defaultdict[str, float]:
    """Hooks that add each token mixer's wall time, by kind, into the returned dict."""
    spent: defaultdict[str, float] = defaultdict(float)

    def start(mixer, args) -> None:
        mixer.started = time.perf_counter()

    def stop(kind: str):
        return lambda mixer, args, out: spent.__setitem__(
            kind, spent[kind] + time.perf_counter() - mixer.started)

    for layer in model.layers:
        kind, mixer = (("linear", layer.linear_attn) if layer.is_linear
                       else ("attention", layer.self_attn))
        mixer.register_forward_pre_hook(start)
        mixer.register_forward_hook(stop(kind))
    return spent


@torch.inference_mode()
def measure(model, spent: defaultdict[str, float], inputs: tuple, iters: int) -> dict[str, float]:
    """Median milliseconds per step: the whole forward, and each kind of mixer (`spent`:
    what the hooks of `time_mixers` add up)."""
    rows = defaultdict(list)
    for i in range(iters + 2):
        spent.clear()
        start = time.perf_counter()
        model(*inputs)
        if i >= 2:
            rows["step"].append(time.perf_counter() - start)
            for kind, seconds in spent.items():
                rows[kind].append(seconds)
    return {kind: 1000 * statistics.median(v) for kind, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prefill-contexts", type=int, nargs="*", default=[256, 1024],
                        help="also time one prompt's prefill: what a prefix-cache hit saves")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="add the hybrid in the batch-invariant mode")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="1 on a machine loaded beyond its cores: OpenMP teams then wait "
                             "for each other at every op")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    models = {"hybrid": build(False, dtype), "all-attention": build(True, dtype)}
    if args.batch_invariant:
        models["hybrid, batch-invariant"] = build(False, dtype)
        enable(models["hybrid, batch-invariant"])
    timers = {name: time_mixers(model) for name, model in models.items()}
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}, batch {args.batch}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name}: {params:.0f}M parameters, "
              f"{model.cfg.num_attention_layers} of {model.cfg.num_layers} layers attention")
    print("| context | model | ms/token | attention layers ms/token | linear layers ms/token |")
    print("|---|---|---|---|---|")
    work = [(c, n) for c in args.contexts for n in models]
    for context, name in tqdm(work, desc="contexts", leave=False):
        inputs = decode_inputs(models[name], args.batch, context, dtype)
        ms = measure(models[name], timers[name], inputs, args.iters)
        per = {kind: value / args.batch for kind, value in ms.items()}
        tqdm.write(f"| {context} | {name} | {per['step']:.2f} | {per.get('attention', 0):.2f} "
                   f"| {per.get('linear', 0):.2f} |")
    if args.prefill_contexts:
        print("\n| prompt tokens | model | prefill ms | ms per 1k tokens |\n|---|---|---|---|")
    work = [(c, n) for c in args.prefill_contexts for n in models]
    for context, name in tqdm(work, desc="prefills", leave=False):
        inputs = prefill_inputs(models[name], context, dtype)
        step = measure(models[name], timers[name], inputs, max(1, args.iters // 5))["step"]
        tqdm.write(f"| {context} | {name} | {step:.0f} | {1000 * step / context:.0f} |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
