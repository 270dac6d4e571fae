"""`tsg train`: train a causal LM on stories, or fine-tune one, with the Hugging Face Trainer under Accelerate.

    tsg train configs/tiny_cpu.json --max_steps 20          # the command line overrides the file
    accelerate launch tsg/train.py configs/tiny_cpu.json    # the same, under any accelerate launcher
    python -m tsg.train configs/tiny_cpu.json --learning_rate 1e-3
    tsg train -c model_finetune.toml --max_steps 3          # a seed project config file

The options are tsg's StoryArguments (tsg.config) beside every transformers.TrainingArguments field; the run itself
is tsg.trainer.train.
"""

import sys

from tsg import config, trainer


def main(argv: list[str] | None = None) -> None:
    config.run(config.TRAIN, trainer.train, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
