"""The `pokeserve` command line."""

from __future__ import annotations

import argparse
import os
import sys

from engine.config import LORA_MODES, QUANTIZATIONS, EngineConfig
from engine.models.default_model import FetchError, fetch_default_model, pokeserve_home
from engine.text.reasoning import REASONING_EFFORTS
from engine.text.reasoning_formats import REASONING_FORMATS
from engine.text.tool_call_formats import TOOL_CALL_FORMATS

API_KEY_ENV = "POKESERVE_API_KEY"
_EFFORTS = ", ".join(f"{name}={value}" for name, value in REASONING_EFFORTS.items())


def _fetch_model(args: argparse.Namespace) -> int:
    try:
        path = fetch_default_model(log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except FetchError as exc:
        print(f"pokeserve fetch-model: {exc}", file=sys.stderr)
        return 1
    print(path)  # the last line of output, for scripts
    return 0


def _serve(args: argparse.Namespace) -> int:
    from api.server import configure_logging, serve
    from api.state import ServerConfig

    keys = list(args.api_key or [])
    if os.environ.get(API_KEY_ENV):
        keys.append(os.environ[API_KEY_ENV])
    config = ServerConfig(api_keys=tuple(keys),
                          served_model_names=tuple(args.served_model_name or ()),
                          reasoning_parser=args.reasoning_parser,
                          reasoning_budget=args.reasoning_budget,
                          max_queued_requests=args.max_queued_requests,
                          tool_call_parser=args.tool_call_parser)
    try:
        EngineConfig(**engine_options(args))    # flags that cannot go together, before loading
        if args.quantization:                   # and one the model has nothing for
            from engine.models.default_model import fetch_default_model
            from engine.models.registry import load_model_config

            load_model_config(args.model or fetch_default_model(), args.quantization)
    except ValueError as exc:
        print(f"pokeserve serve: {exc}", file=sys.stderr)
        return 2
    configure_logging()
    return serve(lambda: _load_engine(args), config, args.host, args.port, args.threads)


def _load_engine(args: argparse.Namespace):
    from engine import Engine

    # The core in a process of its own: its loop runs on that process's main thread, away
    # from the HTTP threads' GIL.
    return Engine(args.model, core="process", **engine_options(args))


def engine_options(args: argparse.Namespace) -> dict:
    """The EngineConfig fields `pokeserve serve`'s arguments ask for."""
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    options = dict(device=device, dtype=getattr(torch, dtype), block_size=args.block_size,
                   max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=args.max_num_batched_tokens,
                   enable_prefix_caching=args.enable_prefix_caching,
                   checkpoint_root=args.checkpoint_root, num_kv_blocks=args.num_kv_blocks,
                   max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
                   max_lora_rank=args.max_lora_rank, lora_mode=args.lora_mode,
                   batch_invariant=args.batch_invariant, quantization=args.quantization)
    if args.kv_cache_memory_gib is not None:
        options["kv_cache_memory"] = int(args.kv_cache_memory_gib * (1 << 30))
    options["gpu_memory_utilization"] = args.gpu_memory_utilization
    return options


def _add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    serve.add_argument("--model", default=None, help="a Hugging Face model directory "
                       "(default: the embedded SmolLM2-135M-Instruct)")
    _add_checkpoint_root(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--api-key", action="append",
                       help=f"require this key on /v1 routes (repeatable; also ${API_KEY_ENV})")
    serve.add_argument("--served-model-name", nargs="+",
                       help="names the base model answers to (default: its directory name)")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if any)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    serve.add_argument("--num-kv-blocks", type=int, default=None,
                       help="KV-cache blocks (default: from --kv-cache-memory-gib)")
    serve.add_argument("--kv-cache-memory-gib", type=float, default=None,
                       help="memory for the KV cache when --num-kv-blocks is not given (GiB; "
                       "default: on CUDA what the model leaves of --gpu-memory-utilization, "
                       "else 1)")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="fraction of the GPU's memory that weights and KV cache may use")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt + completion (default: the model's)")
    serve.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step")
    serve.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="tokens per step (prefill chunks and decodes)")
    serve.add_argument("--batch-invariant", action="store_true",
                       help="a request's tokens and logprobs do not depend, bit for bit, on "
                            "the requests it shares steps with (slower: see BENCHMARKS.md); "
                            "checkpoints are then served merged, one per step")
    serve.add_argument("--quantization", "-q", choices=[q for q in QUANTIZATIONS if q],
                       default=None, help="mxfp4: keep gpt-oss's MXFP4 experts packed, a "
                       "quarter of their bfloat16 memory (gpt-oss-120b on one GPU), read "
                       "packed on CUDA, dequantized per product elsewhere; adapters of the "
                       "experts are refused (default: dequantized once at load)")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=True, help="reuse KV blocks of identical prompt prefixes")
    serve.add_argument("--max-loras", type=_positive_int, default=EngineConfig.max_loras,
                       help="distinct checkpoints (LoRA adapters) that may share one step; the "
                       "base model takes no slot, more checkpoints take turns (default: "
                       "%(default)s)")
    serve.add_argument("--max-cpu-loras", type=_positive_int, default=EngineConfig.max_cpu_loras,
                       help="loaded adapters kept in memory, least recently used dropped first "
                       "(default: no count, only the bytes of adapter factors are bounded)")
    serve.add_argument("--max-lora-rank", type=_positive_int, default=EngineConfig.max_lora_rank,
                       help="the largest LoRA rank served; checkpoints of a higher rank get a "
                       "400 naming their rank (default: %(default)s)")
    serve.add_argument("--lora-mode", choices=LORA_MODES, default=EngineConfig.lora_mode,
                       help="auto: a step with one checkpoint runs it merged into the weights, "
                       "one with several runs the base unmerged plus each row's adapter; merged: "
                       "one checkpoint per step, in turns; unmerged: every step unmerged "
                       "(default: %(default)s)")
    serve.add_argument("--reasoning-parser", choices=sorted(REASONING_FORMATS), default=None,
                       help="the reasoning trace's format for every model served (default: "
                       "detected from the chat template in use, checkpoint's or model's)")
    serve.add_argument("--reasoning-budget", type=_positive_int, default=None,
                       help="thinking tokens that reasoning_effort=1.0 allows; a request's "
                       f"effort ({_EFFORTS}, or a number in [0, 1]) allows "
                       "ceil(effort * budget) tokens before the end of thinking is forced "
                       "(default: the request's max_completion_tokens or max_tokens, else "
                       "the context the prompt leaves)")
    serve.add_argument("--tool-call-parser", choices=sorted(TOOL_CALL_FORMATS), default=None,
                       help="the format models write tool calls in, parsed out of chat "
                       "answers into tool_calls (default: detected from the chat template in "
                       "use; none detected: calls stay in the content)")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="accepted for vLLM's command lines: tool_choice \"auto\" is "
                       "always on here")
    serve.add_argument("--max-queued-requests", type=_positive_int, default=None,
                       help="answer 429 while this many requests already wait for the "
                       "engine (default: no limit)")
    serve.add_argument("--threads", type=int, default=64,
                       help="HTTP worker threads; each streaming client holds one")
    serve.set_defaults(func=_serve)


def _add_checkpoint_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-root", default=str(pokeserve_home() / "checkpoints"),
                        help="directory holding sampler checkpoints (tinker://RUN/KIND/NAME); "
                        "default: $POKESERVE_HOME/checkpoints, where "
                        "scripts/make_demo_checkpoints.py saves them")


def _export(args: argparse.Namespace) -> int:
    import torch

    from engine.checkpoints.errors import CheckpointError
    from engine.checkpoints.export import export_checkpoint

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, model_dir=args.model,
                                checkpoint_root=args.checkpoint_root, dtype=dtype, force=args.force)
    except (CheckpointError, FileExistsError, FetchError) as exc:
        print(f"pokeserve export: {exc}", file=sys.stderr)
        return 1
    print(out)  # the last line of output, for scripts
    return 0


def _add_export_parser(commands) -> None:
    export = commands.add_parser(
        "export", help="write a checkpoint merged into its base as a Hugging Face model "
        "directory that vLLM and SGLang serve unchanged")
    export.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="tinker://RUN/KIND/NAME, a checkpoint directory or archive under "
                        "the root, or the base model's name (no adapter)")
    export.add_argument("out_dir", metavar="OUT_DIR", help="the model directory to write")
    export.add_argument("--model", default=None, help="the base model's directory "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    _add_checkpoint_root(export)
    export.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="dtype of the written weights (default: the base model's)")
    export.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    export.set_defaults(func=_export)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pokeserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch-model", help="make the embedded default model available "
                                "and print its directory")
    fetch.set_defaults(func=_fetch_model)
    _add_serve_parser(commands)
    _add_export_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
