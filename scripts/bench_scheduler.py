"""The scheduler's own cost when an eval's prompts arrive at once. Pure Python, no model.

`--prompts` requests, each a shared `--prefix`-token system prompt and a 16-token
question of its own, are queued together; the scheduler (engine.scheduler, with its
block manager, and for `--hybrid` the linear-attention state slots and kept states)
then runs steps with made-up results, one token each, until every request has its
first token. Prints the milliseconds that schedule() plus update() took over all the
steps, per prompt and in the worst step, for a queue of 10 prompts and for `--prompts`,
and the ratio of the two per-prompt costs: a scheduler whose steps walk the whole queue
(waiting prompts are skipped while the shared prefix is computed) shows it here.

    .venv/bin/python scripts/bench_scheduler.py [--prompts 1000] [--prefix 1000] [--hybrid]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_evals import machine  # noqa: E402

from engine.block_manager import BlockManager  # noqa: E402
from engine.outputs import SeqStepResult  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import Scheduler  # noqa: E402
from engine.sequence import Sequence  # noqa: E402
from engine.state_slots import StateSlotAllocator  # noqa: E402
from engine.state_snapshots import StateSnapshots  # noqa: E402

QUESTION, BLOCK_SIZE, MAX_NUM_SEQS, BUDGET = 16, 16, 256, 8192


def step_times(num_prompts: int, prefix: int, hybrid: bool) -> list[float]:
    """Seconds of each step's schedule() and update() until every prompt has a token."""
    rng = random.Random(0)
    system = [rng.randrange(100, 40000) for _ in range(prefix)]
    blocks = num_prompts * (-(-(prefix + QUESTION + 1) // BLOCK_SIZE)) + 64
    slots = StateSlotAllocator(MAX_NUM_SEQS) if hybrid else None
    kept = StateSnapshots(MAX_NUM_SEQS, MAX_NUM_SEQS) if hybrid else None
    sched = Scheduler(BlockManager(blocks, BLOCK_SIZE), MAX_NUM_SEQS, BUDGET,
                      state_slots=slots, state_snapshots=kept)
    seqs = [Sequence(f"r{i}", system + [rng.randrange(100, 40000) for _ in range(QUESTION)],
                     SamplingParams(max_tokens=1), seed=i) for i in range(num_prompts)]
    for seq in seqs:
        sched.add(seq)
    times = []
    with tqdm(total=num_prompts, desc=f"{num_prompts} prompts", leave=False) as bar:
        while sched.has_work():
            start = time.perf_counter()
            batch = sched.schedule()
            results = {seq: SeqStepResult(token_id=7 if seq.num_computed_tokens + n
                                          == seq.num_tokens else None)
                       for seq, n in zip(batch.seqs, batch.num_new_tokens)}
            updates = sched.update(batch, results)
            times.append(time.perf_counter() - start)
            bar.update(len(updates))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--prefix", type=int, default=1000)
    parser.add_argument("--hybrid", action="store_true",
                        help="a model with linear-attention layers (kept states)")
    args = parser.parse_args()
    print(f"machine: {machine()}; a {args.prefix}-token shared prefix, {QUESTION}-token "
          f"questions, blocks of {BLOCK_SIZE}, {'hybrid' if args.hybrid else 'attention'}")
    print("| prompts queued | steps | ms in all | us a prompt | worst ms a step |")
    print("|---|---|---|---|---|")
    per_prompt = []
    for num_prompts in (10, args.prompts):
        times = step_times(num_prompts, args.prefix, args.hybrid)
        per_prompt.append(sum(times) / num_prompts)
        print(f"| {num_prompts} | {len(times)} | {sum(times) * 1e3:.1f} | "
              f"{per_prompt[-1] * 1e6:.0f} | {max(times) * 1e3:.2f} |")
    print(f"a prompt costs {per_prompt[1] / per_prompt[0]:.2f}x with {args.prompts} queued "
          "than with 10")


if __name__ == "__main__":
    main()
