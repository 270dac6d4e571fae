"""Telling stories with `tsg generate` and the story-telling library `tsg.generation`: banned words in every tokenization, reproducible sampling, batched (left
padded) greedy generation equal to one prompt at a time, markers, streaming, output files, the config file, the
errors, and 8-bit / 4-bit loading.

One tiny GPT-2 (2 layers, width 64, the 512-token sample tokenizer, context 64) is trained once for this module,
with torch directly (one thread, a few seconds), on short stories full of dogs, each "dog" spelt in a random
tokenization, so that it tells of dogs and spells them in many ways.
"""

from __future__ import annotations

import contextlib
import csv
import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SEP, error_line, python_env, run_tsg
from transformers import GPT2Config, GPT2LMHeadModel

from tsg import generation
from tsg.files import UserError
from tsg.generation import Settings, banned_token_sequences, load_model, tell_stories

CONTEXT = 64
DOG = re.compile(r"\bdog\b", re.IGNORECASE)
SENTENCES = ["The dog ran to the park.", "Dog was happy.", "Tom saw a dog and a dog saw Tom.",
             "The little dog liked to play.", "Sue hugged her dog.", "One day, the dog found a big ball.",
             "The dog said woof to the cat."]


def random_spelling(tokenizer, text: str, rng: random.Random) -> list[int]:
    """`text` split at random places into pieces that are vocabulary tokens (tried until every piece is one)."""
    vocab = tokenizer.get_vocab()
    while True:
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        tokens = [chunk.replace(" ", "Ġ") for chunk in chunks]  # byte-level BPE writes a space as Ġ
        if all(t in vocab for t in tokens):
            return [vocab[t] for t in tokens]


def dog_story(tokenizer, rng: random.Random) -> list[int]:
    """A short story of dog sentences, each dog spelt canonically or in a random tokenization, ending in eos."""
    text = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, 4)))
    ids = []
    for part in re.split(r"( ?[Dd]og)", text):
        if DOG.fullmatch(part.strip()) and rng.random() < 0.6:
            ids += random_spelling(tokenizer, part, rng)
        elif part:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these models are too small to gain from two, and two threads spinning on a busy
    2-core machine make training and generation many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """The dog-loving tiny model and its tokenizer, saved with save_pretrained."""
    rng = random.Random(0)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=CONTEXT, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = []
    while len(stream) < 40_000:
        stream += dog_story(tokenizer, rng)
    rows = torch.tensor(stream[: len(stream) // CONTEXT * CONTEXT]).view(-1, CONTEXT)
    model.train()
    for step in range(80):
        batch = rows[torch.randint(len(rows), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 2.0
    folder = tmp_path_factory.mktemp("model") / "dog_run"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir), device="cpu")


def run_main(argv, capsys):
    """`tsg generate ARGV` -> (exit code, stdout, stderr)."""
    return run_tsg(["generate", *argv], capsys)


def continuation(story) -> str:
    return story.text[len(story.prompt):]


# --- banned words ---


def test_banned_sequences_are_every_spelling_of_every_variant(tokenizer):
    sequences = {tuple(s) for s in banned_token_sequences(tokenizer, ["dog"])}
    variants = ["dog", " dog", "Dog", " Dog"]
    assert {tokenizer.decode(list(s)) for s in sequences} == set(variants)
    vocab = tokenizer.get_vocab()
    expected = set()
    for text in variants:  # brute force: every way of cutting the text, kept where each piece is one token
        for mask in range(2 ** (len(text) - 1)):
            cuts = [i for i in range(1, len(text)) if mask >> (i - 1) & 1]
            chunks = [text[a:b].replace(" ", "Ġ") for a, b in zip([0, *cuts], [*cuts, len(text)])]
            if all(c in vocab for c in chunks):
                expected.add(tuple(vocab[c] for c in chunks))
    assert sequences == expected
    pieces = generation.token_pieces(tokenizer)
    assert [generation.count_spellings(v.encode(), pieces) for v in variants] == \
        [len(generation.spellings(v, pieces)) for v in variants]
    for text in variants:  # the canonical tokenization and the letter-by-letter one are among them
        assert tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) in sequences
    assert tuple(vocab[c] for c in ["d", "o", "g"]) in sequences


def test_banned_sequences_count_tokens_that_hold_part_of_a_character(tokenizer):
    sequences = banned_token_sequences(tokenizer, ["café"])
    assert {tokenizer.decode(s) for s in sequences} == {"café", " café", "Café", " Café"}
    usual = tokenizer(" café", add_special_tokens=False)["input_ids"]
    assert usual in sequences and any(tokenizer.decode([t]) == "\ufffd" for t in usual)  # "é" split in bytes


def test_banned_sequences_without_byte_level_decoding(tokenizer, monkeypatch):
    """Other tokenizers (SentencePiece, ...): tokens are read from their decoded text instead."""
    byte_level = {tuple(s) for s in banned_token_sequences(tokenizer, ["dog"])}
    monkeypatch.setattr(type(tokenizer), "backend_tokenizer", property(lambda self: None), raising=False)
    assert {tuple(s) for s in banned_token_sequences(tokenizer, ["dog"])} == byte_level


def test_banned_word_is_never_told(loaded, monkeypatch):
    model, tokenizer = loaded
    settings = Settings(num_return_sequences=50, max_new_tokens=30, seed=1)
    free = tell_stories(model, tokenizer, "One day,", settings)
    banned = tell_stories(model, tokenizer, "One day,", settings, banned_words=("dog",))
    assert len(free) == len(banned) == 50
    assert sum(bool(DOG.search(s.text)) for s in free) >= 40  # the model loves dogs ...
    assert [s.text for s in banned if DOG.search(s.text)] == []  # ... and never tells of one when it is banned
    # banning only the usual tokenization of each variant is not enough: the model spells dogs other ways
    usual = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in generation.word_variants("dog")]
    monkeypatch.setattr(generation, "banned_token_sequences", lambda tok, words: usual if words else [])
    half_banned = tell_stories(model, tokenizer, "One day,", settings, banned_words=("dog",))
    assert sum(bool(DOG.search(s.text)) for s in half_banned) >= 3


def test_banned_words_from_file_via_cli(model_dir, tmp_path, capsys):
    words = tmp_path / "banned.txt"
    words.write_text("dog\n\ncat\n")
    out_file = tmp_path / "stories.jsonl"
    code, out, err = run_main(["--model", model_dir, "-q", "Once upon a time", "-n", 20, "--max_new_tokens", 20,
                               "--banned_words_file", words, "--output", out_file], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == 20 and rows[0]["banned_words"] == "dog cat"
    assert not any(DOG.search(row["story"]) or re.search(r"\bcat\b", row["story"], re.I) for row in rows)


# --- reproducibility and batching ---


def test_same_seed_same_stories(loaded):
    model, tokenizer = loaded
    settings = Settings(num_return_sequences=4, max_new_tokens=25, seed=7)
    first = tell_stories(model, tokenizer, ["Once upon a time", "Tom"], settings)
    again = tell_stories(model, tokenizer, ["Once upon a time", "Tom"], settings)
    other = tell_stories(model, tokenizer, ["Once upon a time", "Tom"], settings, seed=8)
    assert first == again
    assert [s.text for s in first] != [s.text for s in other]


def test_batched_greedy_equals_one_prompt_at_a_time(loaded):
    model, tokenizer = loaded
    prompts = ["Once upon a time", "Tom", "The little dog liked to play with the big red ball in the park", "Sue said"]
    lengths = {len(tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) == len(prompts)  # different lengths: the batch is left padded
    settings = Settings(do_sample=False, max_new_tokens=30)
    batched = tell_stories(model, tokenizer, prompts, settings, batch_size=4)
    alone = [story for p in prompts for story in tell_stories(model, tokenizer, p, settings, batch_size=1)]
    assert [s.text for s in batched] == [s.text for s in alone]
    assert [s.prompt for s in batched] == prompts
    assert all(s.text.startswith(s.prompt) for s in batched)


def test_decoding_layout_changes_strides_not_stories(loaded, tmp_path):
    model, tokenizer = loaded
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    weight = head.weight
    assert embeddings.weight is weight  # GPT-2 ties them
    ids = tokenizer(["The dog saw the ball"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = model(ids).logits
        with generation.decoding_layout(model):
            assert head.weight.stride() == (1, weight.shape[0]) and embeddings.weight is head.weight
            assert torch.equal(head.weight, weight)
            logits = model(ids).logits
        greedy = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert head.weight is weight and embeddings.weight is weight and weight.is_contiguous()  # put back
    strides = []
    hook = head.register_forward_pre_hook(lambda module, args: strides.append(module.weight.stride()))
    try:
        [story] = tell_stories(model, tokenizer, "The dog saw the ball", Settings(do_sample=False, max_new_tokens=30))
        [again] = tell_stories(model, tokenizer, ["The dog saw the ball"], Settings(do_sample=False, max_new_tokens=30),
                               batch_size=4)
    finally:
        hook.remove()
    assert story.text == again.text == tokenizer.decode(greedy[0], skip_special_tokens=True).strip()
    # one forward a new token, each with the laid-out weight, in both calls
    assert len(strides) == story.tokens + again.tokens and set(strides) == {(1, weight.shape[0])}
    assert head.weight is weight
    model.save_pretrained(tmp_path / "saved")  # a transposed-strides weight would not save


def test_stories_stop_at_end_of_story(loaded):
    model, tokenizer = loaded
    stories = tell_stories(model, tokenizer, "Once upon a time", Settings(num_return_sequences=10, max_new_tokens=50))
    lengths = [len(tokenizer(s.text)["input_ids"]) for s in stories]
    assert min(lengths) < len(tokenizer("Once upon a time")["input_ids"]) + 50  # some stopped at eos
    assert not any(SEP in s.text for s in stories)


def test_markers_are_read_and_stripped(loaded):
    model, tokenizer = loaded
    start = "<|startoftext|>"
    stories = tell_stories(model, tokenizer, "Tom ran. The", Settings(num_return_sequences=5, max_new_tokens=30),
                           start_marker=start, end_marker=".")
    for story in stories:  # an end marker inside the prompt does not end the story
        assert story.text.startswith("Tom ran. The") and start not in story.text
        assert "." not in continuation(story)  # the end marker stops the story and is not printed


def test_streamer_strips_markers_split_over_tokens(tokenizer, capsys):
    streamer = generation.StoryStreamer(tokenizer, prompt="A </e> B", start_marker="<s>", end_marker="</e>")
    for chunk in ["<", "s>A </e> B", " and c </", "e> not shown"]:
        streamer.on_finalized_text(chunk)
    streamer.on_finalized_text("", stream_end=True)
    assert capsys.readouterr().out == "A </e> B and c \n"


def test_beam_search(loaded):
    model, tokenizer = loaded
    stories = tell_stories(model, tokenizer, "Once upon a time", Settings(do_sample=False, num_beams=3,
                                                                         num_return_sequences=2, max_new_tokens=20))
    assert [s.number for s in stories] == [1, 2] and stories[0].text != stories[1].text
    with pytest.raises(UserError, match="num_beams"):
        tell_stories(model, tokenizer, "Once", Settings(num_beams=2, num_return_sequences=3))


# --- the command line ---


def test_cli_streams_one_story(model_dir, loaded, capsys):
    markers = {"start_marker": "<|startoftext|>", "end_marker": " dog"}
    prompt = "The dog saw the"  # the end marker inside the prompt does not end the story
    # on the device of `loaded`: a seed gives the same stories on one device, not across devices
    code, out, err = run_main(["--model", model_dir, "-q", prompt, "-n", 1, "-rnd", 3, "--max_new_tokens", 30,
                               "--device", "cpu", *[f"--{k}={v}" for k, v in markers.items()]], capsys)
    assert code == 0, err
    assert "--- story" not in out  # streamed, not numbered
    model, tokenizer = loaded
    [story] = tell_stories(model, tokenizer, prompt, Settings(seed=3, max_new_tokens=30), **markers)
    assert out.strip() == story.text and "<|" not in out and " dog" not in out[len(prompt):]
    assert story.text.startswith(prompt)
    [unmarked] = tell_stories(model, tokenizer, prompt, Settings(seed=3, max_new_tokens=30))
    assert len(story.text) < len(unmarked.text)  # it stopped at the end marker


def test_cli_numbers_stories_and_writes_csv(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nTom had a\n")
    out_file = tmp_path / "out" / "stories.csv"
    code, out, err = run_main(["--model", model_dir, "--prompts_file", prompts, "--num_return_sequences", 2,
                               "--max_new_tokens", 15, "--temperature", 0.8, "--top_k", 20, "--seed", 5,
                               "--batch_size", 1, "--output", out_file], capsys)
    assert code == 0, err
    assert [f"--- story {i}" in out for i in range(1, 5)] == [True] * 4
    with open(out_file, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["prompt"], r["number"]) for r in rows] == [("Once upon a time", "1"), ("Once upon a time", "2"),
                                                          ("Tom had a", "1"), ("Tom had a", "2")]
    row = rows[0]
    assert row["story"].startswith("Once upon a time") and row["story"] in out
    assert (row["temperature"], row["top_k"], row["seed"], row["do_sample"], row["max_new_tokens"]) == \
        ("0.8", "20", "5", "True", "15")
    assert row["model"] == str(model_dir) and row["quantization"] == "none" and row["length_penalty"] == ""
    assert sorted(p.name for p in out_file.parent.iterdir()) == ["stories.csv"]  # no temp file left


def test_config_file_with_comments_and_cli_override(model_dir, tmp_path, capsys):
    config = tmp_path / "gen.yaml"
    config.write_text(f"// what: greedy beams from a file\nmodel: {model_dir}\nprompt: Tom\ngreedy: true\n"
                      "num_return_sequences: 2\nnum_beams: 2\nmax_new_tokens: 10\nbanned_words: [cat]\n")
    out_file = tmp_path / "s.jsonl"
    code, out, err = run_main(["--config", config, "--num_beams", 3, "-n", 3, "--output", out_file], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == 3 and {r["prompt"] for r in rows} == {"Tom"}
    assert rows[0]["do_sample"] is False and rows[0]["temperature"] is None
    assert (rows[0]["num_beams"], rows[0]["max_new_tokens"], rows[0]["banned_words"]) == (3, 10, "cat")


def test_context_overflow_lowers_max_new_tokens(model_dir, capsys):
    code, out, err = run_main(["--model", model_dir, "-q", "Once upon a time", "-n", 2, "--max_new_tokens", 500],
                              capsys)
    assert code == 0 and "max_new_tokens 500 lowered to" in err


@pytest.mark.parametrize("args, message", [
    (["-q", "   "], "prompt: the prompt is empty"),
    (["-q", "dog " * CONTEXT], f"the model's context is {CONTEXT} tokens"),
    (["--temperature", "0"], "temperature: expected a positive number when sampling"),
    (["--output", "stories.txt"], "expected a .csv or .jsonl file"),
    (["--top_p", "1.5"], "top_p: expected a number in (0, 1]"),
    (["--seed", "-1"], "seed: expected an integer from 0 to 4294967295, got -1"),
    (["--quantization", "3bit"], "quantization: invalid choice"),
    (["-n", "0"], "num_return_sequences: expected a positive integer"),
    (["--greedy", "-n", "2"], "without sampling (greedy) would tell the same story each time"),
    (["--do_sample", "false", "-n", "2"], "without sampling (greedy) would tell the same story each time"),
    (["--prompts_file", "missing.txt"], "missing.txt: no such file (prompts_file)"),
    (["--banned_words", "dog", "extraordinary" * 3], "tokenizations with this vocabulary"),
])
def test_cli_errors(model_dir, args, message, capsys):
    code, out, err = run_main(["--model", model_dir, *args], capsys)
    assert code == 2 and message in error_line(err, "generate")


def test_unknown_model_folder_is_an_error_without_hub_lookup(tmp_path, capsys):
    for name in [tmp_path / "nothere", "./runs/nothere", "runs/nothere/"]:
        code, out, err = run_main(["--model", name], capsys)
        assert code == 2 and "no such folder" in error_line(err, "generate")
    (tmp_path / "empty").mkdir()
    code, out, err = run_main(["--model", tmp_path / "empty"], capsys)
    assert code == 2 and "not a model folder" in err
    assert not generation.looks_like_path("gpt2") and not generation.looks_like_path("roneneldan/TinyStories-33M")


def test_unknown_option_is_named_with_a_close_match(model_dir, capsys):
    code, out, err = run_main(["--model", model_dir, "--temprature", "0.5"], capsys)
    assert code == 2 and err == ("tsg generate: error: command line: unknown key 'temprature' "
                                 "(did you mean 'temperature'?)\n")
    code, out, err = run_main(["--help"], capsys)
    assert code == 0 and "--banned_words" in out and "-rnd" in out


def test_unknown_config_key_is_named_with_a_close_match(model_dir, tmp_path, capsys):
    config = tmp_path / "gen.json"
    config.write_text(json.dumps({"// note": "a comment", "model": str(model_dir), "temprature": 0.5}))
    code, out, err = run_main(["--config", config], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "unknown key 'temprature' (did you mean 'temperature'?)" in err
    config.write_text(json.dumps({"model": str(model_dir), "top_k": "many"}))
    code, out, err = run_main(["--config", config], capsys)
    assert code == 2 and "top_k: invalid int value: 'many'" in error_line(err, "generate")
    config = tmp_path / "gen.yaml"
    config.write_text(f"model: {model_dir}\n4: layers\n")  # YAML reads the key as a number
    code, out, err = run_main(["--config", config], capsys)
    assert code == 2 and "unknown key '4'" in err and err.count("\n") == 1


def test_adapter_run_loads_the_merged_model(model_dir, tmp_path, monkeypatch):
    run = tmp_path / "lora_run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    calls = []
    monkeypatch.setattr(generation.adapter, "merged_model_dir",
                        lambda run_dir, base=None, *_: calls.append((run_dir, base)) or model_dir)
    model, tokenizer = load_model(str(run), device="cpu")
    assert calls == [(run, None)] and model.config.n_embd == 64
    load_model(str(run), device="cpu", base_model="gpt2")
    assert calls[-1] == (run, "gpt2")  # the seed's model_name: the base to merge into
    with pytest.raises(UserError, match="use_peft is false, but the folder holds adapter_config.json"):
        load_model(str(run), device="cpu", use_peft=False)
    with pytest.raises(UserError, match="use_peft is true, but the folder holds no adapter_config.json"):
        load_model(str(model_dir), device="cpu", use_peft=True)

    def refuse(run_dir, base=None, *_):
        raise UserError(f"{run_dir}: merged logits differ from the adapter's by 1 > 0.001; nothing written")

    monkeypatch.setattr(generation.adapter, "merged_model_dir", refuse)
    with pytest.raises(UserError, match="merged logits differ"):
        load_model(str(run), device="cpu")


# --- quantized inference ---


@pytest.mark.parametrize("quantization, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_loading_tells_stories(model_dir, quantization, layer):
    pytest.importorskip("bitsandbytes")
    model, tokenizer = load_model(str(model_dir), quantization=quantization, device="cpu")
    assert any(type(m).__name__ == layer for m in model.modules())
    [story] = tell_stories(model, tokenizer, "Once upon a time", Settings(do_sample=False, max_new_tokens=10))
    assert story.text.startswith("Once upon a time") and len(story.text) > len("Once upon a time")


# --- interrupted generation: nothing told is lost ---

PROMPT_WORDS = ["Once upon a time", "Tom had a", "The dog", "A girl", "One day", "Sue saw"]


def many_prompts(tmp_path, n: int = 40) -> Path:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{PROMPT_WORDS[i % len(PROMPT_WORDS)]} {i}\n" for i in range(n)))
    return prompts


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_generation_keeps_every_story_and_resumes_as_if_uninterrupted(model_dir, tmp_path, signum,
                                                                                    capsys):
    words = ["--model", str(model_dir), "--prompts_file", str(many_prompts(tmp_path)), "--batch_size", "2",
             "--max_new_tokens", "30", "--seed", "3", "--device", "cpu"]
    reference = tmp_path / "reference.jsonl"
    assert run_main([*words, "--output", reference], capsys)[0] == 0
    output = tmp_path / "stories.jsonl"
    # SIGINT at its default in the child, whatever this process inherited: a shell starts background jobs with it
    # ignored, and Python then leaves it ignored
    process = subprocess.Popen([sys.executable, "-m", "tsg", "generate", *words, "--output", str(output)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=python_env(),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not output.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first batch is written: interrupt while later ones are told
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err[-2000:]
    kept = jsonl_rows(output)  # a complete, parseable file
    assert 0 < len(kept) < 40 and kept == jsonl_rows(reference)[:len(kept)]
    assert f"({len(kept)} stories in {output}: add --resume to tell the rest)" in err and "Traceback" not in err
    code, _, err = run_main([*words, "--output", output, "--resume"], capsys)
    assert code == 0 and f"resuming: {len(kept)} of 40 prompts told already" in err, err
    assert jsonl_rows(output) == jsonl_rows(reference)  # the same stories an uninterrupted run told


def test_resume_refuses_stories_told_otherwise(model_dir, tmp_path, capsys):
    words = ["--model", model_dir, "--prompts_file", many_prompts(tmp_path, 4), "--max_new_tokens", 10]
    output = tmp_path / "stories.csv"
    assert run_main([*words, "--output", output], capsys)[0] == 0
    code, _, err = run_main([*words, "--output", output, "--resume", "--temperature", "0.7"], capsys)
    assert code == 2 and "stories.csv: its stories were told with temperature 1.0, not 0.7" in error_line(err, "generate")
    code, _, err = run_main([*words, "-q", "Another first prompt", "--output", output, "--resume"], capsys)
    assert code == 2 and "its stories are not those of the first prompts" in error_line(err, "generate")
    code, _, err = run_main([*words, "--resume"], capsys)
    assert code == 2 and "resume: needs output" in error_line(err, "generate")


def test_disk_full_while_writing_keeps_the_batches_before(model_dir, tmp_path, monkeypatch, capsys):
    import errno

    from tsg import generation

    writes = []
    real = generation.replaced_atomically

    @contextlib.contextmanager
    def full_after_two(path):
        writes.append(path)
        with real(path) as tmp:
            if len(writes) > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            yield tmp

    monkeypatch.setattr(generation, "replaced_atomically", full_after_two)
    output = tmp_path / "stories.jsonl"
    code, _, err = run_main(["--model", model_dir, "--prompts_file", many_prompts(tmp_path, 8), "--batch_size", 2,
                             "--max_new_tokens", 10, "--output", output], capsys)
    assert code == 2 and "cannot write (No space left on device); the file holds the stories of the batches before" \
        in error_line(err, "generate")
    assert len(jsonl_rows(output)) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt",
                                                                                              "stories.jsonl"]
