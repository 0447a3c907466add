"""Fine-tune a small reasoning LoRA on the default model, saving sampler checkpoints as it goes.

The demo of "sample while training continues": serve the checkpoint root, run this
script, and chat with each checkpoint as it appears (its name as the `model` field):

    scripts/serve.sh &          # its --checkpoint-root defaults to $POKESERVE_HOME/checkpoints,
    .venv/bin/python scripts/make_demo_checkpoints.py --run-id demo:train:0   # as this one
    # prints tinker://demo:train:0/sampler_weights/000010, ... as each one is complete

The LoRA teaches SmolLM2-135M-Instruct to answer small sums and differences by first
counting inside a `<think>...</think>` trace, with the Qwen3-style chat template in
`demo_chat_template.jinja` (its generation prompt opens `<think>`; `enable_thinking=false`
closes it at once). Each checkpoint carries that template, so serving it uses it instead
of the base model's. The training set is synthetic and deterministic; the questions in
`HELD_OUT` are never trained on, to check by hand that the model generalises.

Training runs on the CPU in float32: rank 8, batches of 4 sequences of about 100
tokens, 40 steps; 1.5 to 6 minutes on a shared 2-core machine, depending on its load.
"""

from __future__ import annotations

import argparse
import random
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine.models.default_model import fetch_default_model, pokeserve_home

TEMPLATE_PATH = Path(__file__).with_name("demo_chat_template.jinja")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTION_FORMS = ["What is {a} {op} {b}?", "How much is {a} {op} {b}?", "Compute {a} {op} {b}.",
                  "What is {a} {word} {b}?"]
HELD_OUT = {(7, "+", 5), (13, "+", 4), (6, "+", 9), (18, "+", 2),
            (9, "-", 3), (16, "-", 7), (12, "-", 8), (20, "-", 6)}
NO_THINKING_FRACTION = 0.2   # examples rendered with enable_thinking=false: answer directly


@dataclass
class Example:
    question: str
    trace: str           # the reasoning, without markers
    answer: str
    enable_thinking: bool


def arithmetic_example(a: int, op: str, b: int, form: str, enable_thinking: bool) -> Example:
    """One question about `a op b` with a counting trace: up for +, down for -. Each number
    counted carries its count, "8 (1), 9 (2)", so when to stop is plain to a small model."""
    word, step, verb = {"+": ("plus", 1, "add"), "-": ("minus", -1, "take away")}[op]
    result = a + step * b
    counted = ", ".join(f"{a + step * i} ({i})" for i in range(1, b + 1))
    direction = "up" if step > 0 else "down"
    trace = (f"I need to {verb} {b} {'to' if op == '+' else 'from'} {a}. "
             f"Counting {direction} {b} from {a}: {counted}.\nSo {a} {op} {b} = {result}.")
    return Example(question=form.format(a=a, op=op, b=b, word=word), trace=trace,
                   answer=f"{a} {op} {b} = {result}.", enable_thinking=enable_thinking)


def build_dataset(seed: int) -> list[Example]:
    """Every sum a + b (a 1..20, b 1..9) and difference a - b (b < a), minus HELD_OUT."""
    rng = random.Random(seed)
    examples = []
    for op in "+-":
        for a in range(1, 21):
            for b in range(1, 10):
                if (a, op, b) in HELD_OUT or (op == "-" and b >= a):
                    continue
                examples.append(arithmetic_example(a, op, b, rng.choice(QUESTION_FORMS),
                                                   rng.random() >= NO_THINKING_FRACTION))
    rng.shuffle(examples)
    return examples


def encode_example(tokenizer, template: str, ex: Example) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the prompt: only the completion is learnt). The prompt
    is encoded alone, as the server encodes it before the model writes the rest."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": ex.question}], chat_template=template, tokenize=False,
        add_generation_prompt=True, enable_thinking=ex.enable_thinking)
    # The prompt already holds "<think>\n" (thinking on) or the closed empty trace (off).
    completion = (f"{ex.trace}\n</think>\n\n" if ex.enable_thinking else "") + ex.answer
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    completion_ids = tokenizer.encode(completion + tokenizer.eos_token, add_special_tokens=False)
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    pad = [width - len(ids) for ids, _ in batch]
    return {  # each [batch, width], padded on the right
        "input_ids": torch.tensor([ids + [pad_id] * p for (ids, _), p in zip(batch, pad)]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * p for (ids, _), p in zip(batch, pad)]),
        "labels": torch.tensor([labels + [-100] * p for (_, labels), p in zip(batch, pad)]),
    }


def save_sampler_checkpoint(model, template: str, directory: Path) -> None:
    """Write the checkpoint layout: adapter weights and config first, the chat template,
    then the empty `checkpoint_complete` marker last, so a server polling the directory
    never loads a half-written checkpoint."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(str(directory))   # adapter_config.json
    (directory / "chat_template.jinja").write_text(template)
    (directory / "checkpoint_complete").touch()


def train(args: argparse.Namespace) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    run_dir = Path(args.checkpoint_root) / args.run_id / "sampler_weights"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} already exists; pick another --run-id")
    template = TEMPLATE_PATH.read_text()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    data = [encode_example(tokenizer, template, ex) for ex in build_dataset(args.seed)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    rng = random.Random(args.seed)
    saved = []
    bar = tqdm(range(1, args.steps + 1), desc="training", unit="step")
    for step in bar:
        batch = collate(rng.sample(data, args.batch_size), tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.save_every == 0 or step == args.steps:
            directory = run_dir / f"{step:06d}"
            save_sampler_checkpoint(model, template, directory)
            saved.append(directory)
            tqdm.write(f"tinker://{args.run_id}/sampler_weights/{step:06d}")
    return saved


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-root", default=str(pokeserve_home() / "checkpoints"),
                        help="where runs are saved (default: $POKESERVE_HOME/checkpoints)")
    parser.add_argument("--run-id", default=None,
                        help="the run's id, one path component (default: <uuid>:train:0)")
    parser.add_argument("--model-dir", default=None, help="base model (default: the embedded one)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.run_id is None:
        args.run_id = f"{uuid.uuid4()}:train:0"
    if not args.run_id or "/" in args.run_id or args.run_id in (".", "..") or "\0" in args.run_id:
        parser.error(f"--run-id must be a single path component, got {args.run_id!r}")
    for name in ("steps", "save_every", "batch_size", "rank", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.model_dir is None:
        args.model_dir = str(fetch_default_model(log=lambda msg: print(msg, file=sys.stderr)))
    return args


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
