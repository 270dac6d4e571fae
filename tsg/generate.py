"""Tell stories with a trained model.

    python -m tsg.generate --model runs/tiny_cpu --prompt "Once upon a time" -n 3
    make generate PROMPT="Once upon a time" MODEL=runs/tiny_cpu

`--model` is a folder saved by `tsg.train` or a hub name. Each story stops at the end-of-story token.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed


def load(model_dir: str):
    """Model (eval mode) and tokenizer from a saved folder or the hub."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {model_dir}: no model could be loaded ({' '.join(str(e).split())[:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def tell_stories(model, tokenizer, prompt: str, num_return_sequences: int = 1, max_new_tokens: int = 200,
                 do_sample: bool = True, temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
                 seed: int = 0) -> list[str]:
    """`num_return_sequences` stories that start with `prompt`, without the end-of-story marker."""
    if not prompt.strip():
        raise ValueError("--prompt: the prompt is empty")
    if do_sample and temperature <= 0:
        raise ValueError(f"--temperature: expected a positive number when sampling, got {temperature}")
    set_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_k=top_k if do_sample else None,
            top_p=top_p if do_sample else None,
            num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in output]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tsg.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder saved by tsg.train, or a hub name")
    parser.add_argument("--prompt", "-q", default="Once upon a time", help="how each story starts")
    parser.add_argument("--num_return_sequences", "-n", type=int, default=1, help="how many stories")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--greedy", action="store_true", help="take the likeliest token instead of sampling")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", "-rnd", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if not Path(args.model).is_dir() and args.model.startswith((".", "/", "runs")):
            raise ValueError(f"--model {args.model}: no such folder")
        model, tokenizer = load(args.model)
        stories = tell_stories(model, tokenizer, args.prompt, args.num_return_sequences, args.max_new_tokens,
                               not args.greedy, args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        print(f"tsg.generate: error: {e}", file=sys.stderr)
        sys.exit(2)
    for i, story in enumerate(stories, 1):
        print(f"--- story {i} ---\n{story}\n")


if __name__ == "__main__":
    main()
