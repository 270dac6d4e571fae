"""`tsg`: one command, a subcommand for each step from stories to a story-telling model.

    tsg train configs/tiny_cpu.json --max_steps 20
    tsg generate --model runs/tiny_cpu -q "Once upon a time"
    tsg <command> --help        # that command's options, with their defaults
"""

from __future__ import annotations

import importlib
import sys

# subcommand: (the module whose main(argv) runs it, one line of what it does)
COMMANDS = {
    "prepare": ("tsg.prepare", "TinyStories .txt -> train/validation CSV files (the seed project's data preparation)"),
    "train": ("tsg.train", "train or fine-tune a model on stories (LoRA, 8-bit/4-bit QLoRA) with the HF Trainer"),
    "merge": ("tsg.merge", "merge a LoRA adapter into its full-precision base, self-checked"),
    "generate": ("tsg.generate", "tell stories with a trained model, an adapter run or a hub model"),
    "evaluate": ("tsg.evaluate.__main__", "held-out loss and bits per byte, and scores of the stories a model tells"),
    "export": ("tsg.export", "a model as a GGUF file for llama.cpp, checked against the model's own logits"),
    "play": ("tsg.play", "a story playground in the browser: tell, compare two models, see a run's loss curves"),
    "bench": ("tsg.bench", "measure what each choice costs: throughput, MFU, memory, generation speed"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["tsg: the Tiny Story Generator toolkit", "", "usage: tsg <command> [CONFIG] [--key value ...]", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    lines += ["", "Run `tsg <command> --help` for a command's options; each also runs as `python -m tsg.<command>`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run `tsg <command> ...` (argv: the words after `tsg`; default sys.argv[1:]). Returns nothing: the console
    script passes a returned value to sys.exit."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        from tsg import __version__

        print(f"tsg {__version__}")
        return
    name, *rest = argv
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (commands: {', '.join(COMMANDS)})"
        print(f"tsg: error: unknown command '{name}'{hint}", file=sys.stderr)
        sys.exit(2)
    importlib.import_module(COMMANDS[name][0]).main(rest)


if __name__ == "__main__":
    main()
