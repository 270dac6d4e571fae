"""Scoring a model with `tsg.evaluate`: exact held-out loss and bits per byte on a model whose probabilities are
known, windows over long stories, story_scores on hand-made stories, generation equal to tsg.generate's, and the
command line end to end with its errors.

The "known" models are tiny GPT-2s whose output does not depend on the input: the last layer norm's weight is
zero, so the final hidden state is its bias (a unit vector), and the untied output layer is zero but for the
end-of-story token's logit `a`. Every next-token distribution is then P(eos) = e^a / (e^a + V - 1) and
(1 - P(eos)) / (V - 1) for each other token: a = 0 is the uniform distribution, NLL ln V per token.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import error_line, python_env, write_txt
from datasets import Dataset, DatasetDict
from transformers import GPT2Config, GPT2LMHeadModel

from tsg import cli, data, scoring as ev
from tsg.data import story_text, story_token_ids
from tsg.generation import Settings, load_model, tell_stories
from tsg.model import context_length

CONTEXT = 64
P_EOS = 0.15


def known_model(tokenizer, p_eos: float | None = None) -> GPT2LMHeadModel:
    """A GPT-2 whose every next-token distribution is P(eos) = p_eos, the other tokens alike (uniform: None)."""
    vocab = len(tokenizer)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=CONTEXT, vocab_size=vocab,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        if p_eos is not None:
            model.lm_head.weight[tokenizer.eos_token_id, 0] = math.log(p_eos * (vocab - 1) / (1 - p_eos))
    return model


def save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def uniform_dir(tmp_path_factory, tokenizer) -> Path:
    return save(known_model(tokenizer), tokenizer, tmp_path_factory.mktemp("uniform"))


@pytest.fixture(scope="module")
def eos_dir(tmp_path_factory, tokenizer) -> Path:
    return save(known_model(tokenizer, P_EOS), tokenizer, tmp_path_factory.mktemp("eos"))


@pytest.fixture(scope="module")
def stories(sample_stories) -> list[str]:
    """Twelve sample stories, long and short: most are longer than the 64-token context (scored in windows)."""
    return sample_stories[:12]


@pytest.fixture(scope="module")
def valid_txt(tmp_path_factory, stories) -> Path:
    return write_txt(tmp_path_factory.mktemp("valid") / "valid.txt", stories)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("Once upon a time\n\nTom had a dog.\nThe sun was hot.\n", encoding="utf-8")
    return path


def hand_counts(tokenizer, stories: list[str]) -> tuple[int, int, int]:
    """(stories, predicted tokens: every token of each story and its closing eos, UTF-8 bytes of the texts)."""
    predicted = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 1 for s in stories)
    return len(stories), predicted, sum(len(s.encode("utf-8")) for s in stories)


def evaluate_cli(*words) -> dict:
    """`tsg evaluate WORDS`; returns the report it wrote (at --output, else beside the model)."""
    words = [str(w) for w in words]
    cli.main(["evaluate", *words])
    output = words[words.index("--output") + 1] if "--output" in words else \
        Path(words[words.index("--model") + 1]) / "eval_report.json"
    return json.loads(Path(output).read_text(encoding="utf-8"))


# --- held-out scores ---


def test_uniform_model_bits_per_byte_by_hand(uniform_dir, valid_txt, stories, tokenizer, tmp_path):
    n_stories, predicted, n_bytes = hand_counts(tokenizer, stories)
    vocab = len(tokenizer)
    report = evaluate_cli("--model", uniform_dir, "--data", valid_txt, "--output", tmp_path / "r.json",
                          "--num_samples_per_prompt", "0", "--batch_size", "5")
    assert report["long_stories"] > 0  # windows were used
    assert (report["stories"], report["predicted_tokens"], report["bytes"]) == (n_stories, predicted, n_bytes)
    assert report["tokens"] == predicted  # each story's tokens with its eos; the eos context is not counted
    assert report["eval_loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert report["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(predicted * math.log(vocab) / n_bytes / math.log(2), rel=1e-6)
    assert report["eos_rate"] is None and report["generated_stories"] == 0


def test_known_eos_probability_by_hand(tokenizer, stories):
    """Every story's eos is predicted once with P_EOS, every other token with (1 - P_EOS) / (V - 1)."""
    n_stories, predicted, n_bytes = hand_counts(tokenizer, stories)
    other = (1 - P_EOS) / (len(tokenizer) - 1)
    nll = -n_stories * math.log(P_EOS) - (predicted - n_stories) * math.log(other)
    result = ev.score_stories(known_model(tokenizer, P_EOS), tokenizer, stories, batch_size=3)
    assert result.nll == pytest.approx(nll, rel=1e-6)
    assert result.eval_loss == pytest.approx(nll / predicted, rel=1e-6)
    assert result.bits_per_byte == pytest.approx(nll / n_bytes / math.log(2), rel=1e-6)


@pytest.mark.parametrize("length", [2, 5, 63, 64, 65, 96, 97, 200])
@pytest.mark.parametrize("context", [2, 3, 64])
def test_windows_score_each_token_once_with_half_a_context(length, context):
    spans = ev.windows(length, context)
    scored = [t for begin, end, n in spans for t in range(end - n, end)]
    assert scored == list(range(1, length))
    for begin, end, n in spans:
        assert end - begin <= context and 1 <= n <= end - begin - 1
        if length > context:
            assert end - n - begin >= context - context // 2 or begin == 0  # context before each scored token
    assert len(spans) == 1 if length <= context else len(spans) > 1


def test_scores_equal_the_model_on_each_story_alone(tiny_model, tokenizer, stories):
    """Batched, padded and windowed scoring equals the model's own loss on each story, window by window."""
    model = tiny_model(tokenizer)  # context 64
    assert context_length(model.config) == CONTEXT
    eos = tokenizer.eos_token_id
    batched = ev.score_stories(model, tokenizer, stories, batch_size=7)
    first_total = 0.0
    for text, nll in zip(stories, batched.nll_per_story):
        story = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        with torch.no_grad():  # the first token from the eos token alone
            first = -torch.log_softmax(model(input_ids=torch.tensor([[eos]])).logits[0, -1], -1)[story[0]].item()
        rest = 0.0
        for begin, end, n in ev.windows(len(story), CONTEXT):
            ids = torch.tensor([story[begin:end]])
            labels = ids.clone()
            labels[0, : end - begin - n] = -100
            with torch.no_grad():
                rest += model(input_ids=ids, labels=labels).loss.item() * n
        assert nll == pytest.approx(first + rest, rel=1e-4)
        first_total += first
    assert batched.first_token_nll == pytest.approx(first_total, rel=1e-4)
    assert batched.loss_after_first_token == pytest.approx(
        (batched.nll - first_total) / (batched.tokens - len(stories)), rel=1e-4)


def test_stories_are_tokenized_as_the_trainer_does(tokenizer, stories):
    marked = [stories[0] + " <|endoftext|>", "  " + stories[1] + "\n"]  # tsg.prepare's marker, stray spaces
    trained = data.tokenize_stories(DatasetDict({"validation": Dataset.from_dict({"text": marked})}), tokenizer)
    assert story_token_ids(tokenizer, marked) == trained["validation"]["input_ids"]
    assert story_text(marked[0], tokenizer.eos_token) == stories[0]


# --- generation scores ---


def test_story_scores_by_hand():
    scores = ev.load_story_scores()
    result = scores.compute(predictions=["a b c a b c a b", "A B d"], eos_reached=[True, False], lengths=[10, 4])
    assert result["distinct_1"] == pytest.approx(4 / 11)  # a b c d / 11 words
    assert result["distinct_2"] == pytest.approx(4 / 9)  # ab bc ca bd / 7 + 2
    assert result["distinct_3"] == pytest.approx(4 / 7)  # abc bca cab abd / 6 + 1
    assert result["repeated_4gram_share"] == pytest.approx(2 / 5)  # abca bcab cabc ABCA BCAB; "a b d" has none
    assert result["eos_rate"] == 0.5 and result["mean_length"] == 7.0
    assert result["copied_8gram_share"] is None  # no training texts
    assert set(result) == set(ev.SCORE_KEYS[3:])


def test_copied_8grams_by_hand():
    """Words are lower-cased and split on whitespace (punctuation stays); 8-grams never cross training stories."""
    generated = ["one two three four five six seven eight nine", "a b c a b c a b", "too short"]
    train = ["Zero ONE two three four five six seven eight ten",  # one..eight: copied
             "a b c a b c a", "b",  # a b c a b c a b only across two stories: not copied
             "two three four five six seven eight nine."]  # "nine." is not "nine"
    result = ev.load_story_scores().compute(predictions=generated, train_texts=iter(train))
    assert result["copied_8gram_share"] == pytest.approx(1 / 3)  # 1 of (2 + 1 + 0) generated 8-grams
    assert result["eos_rate"] is None and result["mean_length"] is None


def test_story_scores_load_by_path_without_the_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("story_scores tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    import evaluate

    metric = evaluate.load(str(ev.STORY_SCORES))
    assert isinstance(metric, evaluate.Metric)
    assert metric.compute(predictions=["x y z"])["distinct_1"] == 1.0


def test_told_stories_count_their_tokens_and_end(eos_dir):
    model, tokenizer = load_model(str(eos_dir), device="cpu")
    settings = Settings(max_new_tokens=8, top_k=0, num_return_sequences=4, seed=3, batch_size=2)
    prompts = ["Once upon a time", "Tom had a dog.", "The sun was hot."]
    told = tell_stories(model, tokenizer, prompts, settings)
    assert told == tell_stories(model, tokenizer, prompts, settings)
    assert {s.ended for s in told} == {True, False}  # P(eos) = 0.15 a token: some end, some run out
    for s in told:
        assert s.length == settings.max_new_tokens if not s.ended else s.length < settings.max_new_tokens
        assert s.tokens == s.length + s.ended  # the end-of-story token counted in tokens, not in length
        assert s.continuation in s.text


# --- the command line ---


def test_cli_end_to_end(uniform_dir, valid_txt, prompts_file, small_txt, tmp_path, capsys):
    report = evaluate_cli("--model", uniform_dir, "--data", valid_txt, "--prompts", prompts_file,
                          "--num_samples_per_prompt", "2", "--max_new_tokens", "30", "--max_stories", "5",
                          "--train_data", small_txt, "--seed", "1")
    assert (uniform_dir / "eval_report.json").is_file()  # the default: beside the model
    for key in (*ev.SCORE_KEYS, "settings", "model", "data", "stories", "tokens", "bytes", "samples"):
        assert key in report
        assert report[key] is not None, key
    assert report["stories"] == 5 and report["generated_stories"] == 6
    assert report["settings"] | {"max_new_tokens": 30, "seed": 1, "temperature": 1.0, "top_k": None,
                                 "top_p": 1.0} == report["settings"]
    assert 0 <= report["eos_rate"] <= 1 and 0 <= report["mean_length"] <= 30
    assert 0 <= report["copied_8gram_share"] <= 1
    assert report["samples"] and "bits_per_byte" in report["definitions"]
    out = capsys.readouterr().out
    assert "bits_per_byte" in out and "--- sample 1" in out
    assert not list(uniform_dir.glob(".*.tmp"))  # written atomically: no temp file left


@pytest.mark.parametrize("case", ["no data file", "no model", "not a model", "bad max_stories", "unknown option",
                                  "empty data", "no prompts", "output is a folder", "no text column",
                                  "train data without text column", "prompt too long"])
def test_bad_input_is_one_line_and_exit_2(case, uniform_dir, valid_txt, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n", encoding="utf-8")
    csv = tmp_path / "stories.csv"
    csv.write_text("story\nOnce upon a time.\n", encoding="utf-8")
    long = tmp_path / "long.txt"
    long.write_text("word " * 200 + "\n", encoding="utf-8")
    base = {"--model": str(uniform_dir), "--data": str(valid_txt), "--output": str(tmp_path / "r.json")}
    change, expected = {
        "no data file": ({"--data": str(tmp_path / "missing.txt")}, "missing.txt: no such file (data)"),
        "no model": ({"--model": str(tmp_path / "missing")}, "missing: no such folder"),
        "not a model": ({"--model": str(tmp_path)}, f"{tmp_path}: not a model folder"),
        "bad max_stories": ({"--max_stories": "0"}, "max_stories: expected a positive integer"),
        "unknown option": ({"--temperatur": "2"}, "unknown key 'temperatur'"),
        "empty data": ({"--data": str(empty)}, "empty.txt: no stories"),
        "no prompts": ({"--prompts": str(blank)}, "blank.txt: the file holds no lines (prompts)"),
        "output is a folder": ({"--output": str(tmp_path)}, "is a folder"),
        "no text column": ({"--data": str(csv)}, "stories.csv: no 'text' column"),
        "train data without text column": ({"--train_data": str(csv)}, "stories.csv: no 'text' column"),
        "prompt too long": ({"--prompts": str(long)}, "tokens long, but the model's context is"),
    }[case]
    argv = [word for option, value in (base | change).items() for word in (option, value)]
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", *argv])
    assert stop.value.code == 2 and expected in error_line(capsys.readouterr().err, "evaluate")
    assert not (tmp_path / "r.json").exists()


def test_python_m_missing_data_exits_2(uniform_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "tsg.evaluate", "--model", str(uniform_dir), "--data",
                          str(tmp_path / "missing.txt")], capture_output=True, text=True, env=python_env(),
                         timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == f"tsg evaluate: error: {tmp_path / 'missing.txt'}: no such file (data)"
