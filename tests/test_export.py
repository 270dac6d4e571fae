"""`tsg export`: GGUF files for llama.cpp, read back with the gguf package's reader: every tensor laid out as
llama.cpp expects it, every tokenizer entry, and the refusals (an architecture llama.cpp does not run here, a
tokenizer that is not GPT-2's byte-level one). ONNX folders, run by ONNX Runtime step by step through their past
key values: the greedy story is tsg's, and a graph whose logits differ is not kept.

With llama.cpp's tools built (`make clients`; the tests look in $TSG_CLIENTS, default ~/.cache/tsg/clients), the
last tests run them: llama.cpp's tokenizer gives tsg's ids on hard strings, and its greedy story is tsg's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import error_line, run_tsg, tiny_args
from transformers import AutoTokenizer

from tsg import model as models
from tsg import conversion
from tsg.conversion import (PRE_TOKENIZER, check_byte_level_gpt2, llama_cpp_tensors, onnx_greedy, onnx_session,
                            write_gguf)
from tsg.files import UserError
from tsg.generation import Settings, load_model, tell_stories

SHAPES = {
    "llama": dict(model_type="llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, block_size=64,
                  config_overrides={"intermediate_size": 96, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "gpt2": dict(model_type="gpt2", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, block_size=64),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def model_dir(request, tmp_path_factory, tokenizer, sample_stories) -> Path:
    """A tiny model of each architecture that exports, with the tokenizer tsg trained, trained for 200 steps on the
    sample (a barely trained model's near-even logits would let two correct decoders pick different greedy
    tokens)."""
    torch.manual_seed(0)
    model = models.load_model(tiny_args(**SHAPES[request.param], packing="concat"), tokenizer)
    stream = [i for story in sample_stories[:300] for i in tokenizer(story)["input_ids"] + [tokenizer.eos_token_id]]
    rows = torch.tensor(stream[: len(stream) // 64 * 64]).view(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        batch = rows[torch.randint(len(rows), (16,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    folder = tmp_path_factory.mktemp("export") / request.param
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def field_value(reader, key):
    field = reader.fields[key]
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [bytes(field.parts[i]).decode() if field.types[-1] == gguf.GGUFValueType.STRING
                else field.parts[i].tolist()[0] for i in field.data]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


def test_every_tensor_is_laid_out_for_llama_cpp(model_dir):
    path, check = write_gguf(str(model_dir), model_dir / "model.gguf")
    model, _ = load_model(str(model_dir), device="cpu")
    reader = gguf.GGUFReader(path)
    arch = field_value(reader, "general.architecture")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2, 2)
    expected = {names.get_name(name, try_suffixes=(".weight", ".bias")): tensor
                for name, tensor in llama_cpp_tensors(model).items()}
    found = {t.name: np.asarray(t.data).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}
    assert set(found) == set(expected) and "output.weight" not in found  # tied: llama.cpp reuses token_embd
    for name, tensor in expected.items():
        np.testing.assert_array_equal(found[name], tensor.numpy(), err_msg=name)
    config = model.config
    if arch == "gpt2":  # Conv1D [in, out] transposed to llama.cpp's [out, in]
        qkv = model.transformer.h[0].attn.c_attn.weight
        np.testing.assert_array_equal(found["blk.0.attn_qkv.weight"], qkv.detach().t().numpy())
        assert field_value(reader, "gpt2.context_length") == config.n_positions
    else:  # rows of q and k in pairs of consecutive values per head, k with its 2 key/value heads
        q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
        head = q.reshape(4, 16, 64)[0]
        np.testing.assert_array_equal(found["blk.0.attn_q.weight"][:16], head.reshape(2, 8, 64).swapaxes(0, 1)
                                      .reshape(16, 64))
        assert found["blk.0.attn_k.weight"].shape == (32, 64)
        assert (field_value(reader, "llama.attention.head_count"),
                field_value(reader, "llama.attention.head_count_kv")) == (4, 2)
    assert check.max_abs_logit_diff <= check.tolerance and check.same_tokens


def test_every_tokenizer_entry_is_written(model_dir, tokenizer):
    path, _ = write_gguf(str(model_dir), model_dir / "model.gguf")
    reader = gguf.GGUFReader(path)
    vocab = {i: token for token, i in tokenizer.get_vocab().items()}
    assert field_value(reader, "tokenizer.ggml.model") == "gpt2"
    assert field_value(reader, "tokenizer.ggml.pre") == PRE_TOKENIZER == "gpt-2"
    assert field_value(reader, "tokenizer.ggml.tokens") == [vocab[i] for i in range(len(vocab))]
    types = field_value(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL and types.count(gguf.TokenType.NORMAL) == len(vocab) - 1
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert field_value(reader, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in merges]
    for key in ("bos", "eos", "padding"):
        assert field_value(reader, f"tokenizer.ggml.{key}_token_id") == tokenizer.eos_token_id
    assert field_value(reader, "tokenizer.ggml.add_bos_token") is False  # stories start without BOS, as trained


@pytest.mark.parametrize("outtype, qtype", [("f16", gguf.GGMLQuantizationType.F16),
                                            ("q8_0", gguf.GGMLQuantizationType.Q8_0)])
def test_smaller_outtypes_keep_norms_in_f32_and_pass_their_check(model_dir, outtype, qtype):
    path, check = write_gguf(str(model_dir), model_dir / f"model-{outtype}.gguf", outtype)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == qtype and types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert 0 < check.max_abs_logit_diff <= check.tolerance  # rounded, within the outtype's tolerance


def test_cli_writes_the_default_file_and_says_what_it_checked(model_dir, capsys):
    code, _, err = run_tsg(["export", model_dir, "--outtype", "f16"], capsys)
    assert code == 0, err
    path = model_dir / f"{model_dir.name}-f16.gguf"
    assert path.is_file() and f"wrote {path} (" in err and "MB, f16)" in err
    assert re.search(r"checked: next-token logits on 3 probe texts within \S+ of the model's", err)
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]  # no temporary file or folder left


def test_gpt_neo_is_refused_naming_the_architectures_that_export(tmp_path, tokenizer, capsys):
    torch.manual_seed(0)
    args = tiny_args(model_type="gpt_neo", config_overrides={"attention_types": [[["global", "local"], 1]]})
    models.load_model(args, tokenizer).save_pretrained(tmp_path / "neo")
    tokenizer.save_pretrained(tmp_path / "neo")
    code, _, err = run_tsg(["export", tmp_path / "neo", "--output", tmp_path / "neo.gguf"], capsys)
    assert code == 2 and "model_type 'gpt_neo': llama.cpp runs no such GGUF here" in error_line(err, "export")
    assert "llama, gpt2" in err and not (tmp_path / "neo.gguf").exists()


def test_a_tokenizer_that_is_not_gpt2_byte_level_is_refused(model_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, models as tok_models, normalizers, pre_tokenizers

    other = Tokenizer(tok_models.BPE(unk_token="[UNK]"))
    other.normalizer = normalizers.Lowercase()
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=other, eos_token="[UNK]")
    with pytest.raises(UserError, match=r"not GPT-2's byte-level tokenizer \(it has a normaliser \(Lowercase\); "
                                        r"its pre-tokenizer is Whitespace"):
        check_byte_level_gpt2(wrapped)
    folder = tmp_path / "other"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("*.gguf"))
    wrapped.save_pretrained(folder)
    code, _, err = run_tsg(["export", folder], capsys)
    assert code == 2 and "llama.cpp would split its text differently" in error_line(err, "export")
    assert not list(folder.glob("*.gguf"))
    check_byte_level_gpt2(AutoTokenizer.from_pretrained(model_dir))  # tsg's own passes


@pytest.mark.parametrize("words, message", [
    ([], "model: required"),
    (["{model}", "--outtype", "q4"], "outtype: invalid choice"),
    (["{model}", "--output", "x.bin"], "expected a .gguf file name"),
    (["nothere/"], "nothere/: no such folder"),
])
def test_bad_options(model_dir, words, message, capsys):
    code, _, err = run_tsg(["export", *[w.format(model=model_dir) for w in words]], capsys)
    assert code == 2 and message in error_line(err, "export")


# --- ONNX ---


@pytest.fixture(scope="module")
def onnx_dir(model_dir, tmp_path_factory) -> Path:
    """`tsg export MODEL --format onnx --output DIR` of each architecture (exported once: tens of seconds)."""
    from tsg.cli import main

    output = tmp_path_factory.mktemp("onnx") / model_dir.name
    with contextlib.redirect_stderr(io.StringIO()) as err:
        main(["export", str(model_dir), "--format", "onnx", "--output", str(output)])
    (output / "export.log").write_text(err.getvalue())
    return output


def test_onnx_folder_is_laid_out_for_transformers_js(onnx_dir):
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in onnx_dir.iterdir()}
    session = onnx_session(onnx_dir / "onnx" / "model.onnx")
    names = [i.name for i in session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")]
    assert [o.name for o in session.get_outputs()] == ["logits"] + [f"present.{i}.{kind}" for i in range(2)
                                                                   for kind in ("key", "value")]
    assert session.get_inputs()[3].shape[2] == "past_sequence_length"  # any length, an empty past included
    log = (onnx_dir / "export.log").read_text()
    assert f"wrote {onnx_dir / 'onnx' / 'model.onnx'} (" in log
    assert re.search(r"checked under ONNX Runtime: logits on 3 probe texts and 15 greedy steps after each", log)


def test_onnx_runtime_tells_tsg_greedy_story(onnx_dir, model_dir):
    model, tokenizer = load_model(str(model_dir), device="cpu")
    prompt, n = "Once upon a time", 30
    [story] = tell_stories(model, tokenizer, prompt, Settings(do_sample=False, max_new_tokens=n))
    ids = tokenizer(prompt)["input_ids"]
    new = onnx_greedy(onnx_session(onnx_dir / "onnx" / "model.onnx"), ids, n, {tokenizer.eos_token_id})
    assert len(new) >= 20 and tokenizer.decode(ids + new, skip_special_tokens=True).strip() == story.text


def test_onnx_export_whose_logits_differ_keeps_nothing(onnx_dir, model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(conversion, "export_onnx_graph",  # the graph exported already, to spare a second export
                        lambda model, path: shutil.copyfile(onnx_dir / "onnx" / "model.onnx", path))
    real = conversion.onnx_logits
    monkeypatch.setattr(conversion, "onnx_logits", lambda *a, **k: (lambda out: (out[0] + 0.5, out[1]))(real(*a, **k)))
    code, _, err = run_tsg(["export", model_dir, "--format", "onnx", "--output", tmp_path / "web"], capsys)
    assert code == 2 and "ONNX Runtime's logits differ by 0.5" in error_line(err, "export")
    assert not (tmp_path / "web").exists() and not list(tmp_path.iterdir())  # no folder, no temporary one


@pytest.mark.parametrize("words, message", [
    (["--outtype", "f16"], "outtype f16: the ONNX export is f32"),
    (["--output", "{model}/config.json"], "config.json: not a folder"),
    (["--output", "{other}"], "holds a model of its own; export into a new folder"),
])
def test_bad_onnx_options(model_dir, words, message, tmp_path, capsys):
    other = tmp_path / "other_run"  # another model's folder
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"weights")
    code, _, err = run_tsg(["export", model_dir, "--format", "onnx",
                            *[w.format(model=model_dir, other=other) for w in words]], capsys)
    assert code == 2 and message in error_line(err, "export")


# --- llama.cpp itself (make clients) ---

CLIENTS = Path(os.environ.get("TSG_CLIENTS", Path.home() / ".cache" / "tsg" / "clients"))
LLAMA_BIN = CLIENTS / "llama.cpp" / "build" / "bin"
needs_llama_cpp = pytest.mark.skipif(not (LLAMA_BIN / "llama-completion").is_file(),
                                     reason=f"llama.cpp's tools are not built in {LLAMA_BIN} (make clients)")
HARD_TEXTS = ["Once upon a time", " Once upon a time", "  two  spaces", "new\nlines\n\nhere", "digits 1 22 333 4444",
              "Hello, world! It's 'quoted' (and) [bracketed]...", "café naïve über 😊", "\tTab and trailing "]


@needs_llama_cpp
def test_llama_cpp_tokenizes_as_tsg(model_dir, tokenizer):
    path, _ = write_gguf(str(model_dir), model_dir / "model.gguf")
    for text in HARD_TEXTS:
        done = subprocess.run([str(LLAMA_BIN / "llama-tokenize"), "-m", str(path), "-p", text, "--ids",
                               "--no-bos", "--log-disable"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        ids = json.loads(done.stdout.strip().splitlines()[-1])
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], text


@needs_llama_cpp
def test_llama_cpp_tells_tsg_greedy_story(model_dir):
    path, _ = write_gguf(str(model_dir), model_dir / "model.gguf")
    prompt, n = "Once upon a time", 20
    outputs = []
    for _ in range(5):  # llama-completion prints through an asynchronous log: now and then a pipe gets a cut-off tail
        done = subprocess.run([str(LLAMA_BIN / "llama-completion"), "-m", str(path), "-p", prompt, "-n", str(n),
                               "--temp", "0", "-no-cnv", "--no-warmup", "--simple-io", "-t", "1"],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=300)  # the story on stdout
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout.decode("utf-8", errors="replace").strip().removesuffix("[end of text]").strip())
    model, tokenizer = load_model(str(model_dir), device="cpu")
    [story] = tell_stories(model, tokenizer, prompt, Settings(do_sample=False, max_new_tokens=n))
    told = max(outputs, key=len)
    assert told == story.text and all(story.text.startswith(output) for output in outputs)


# --- tsg generate --backend llama.cpp (llama-cpp-python: the llamacpp extra, make clients) ---

try:
    import llama_cpp  # noqa: F401
    HAS_LLAMA_CPP_PYTHON = True
except ImportError:
    HAS_LLAMA_CPP_PYTHON = False
needs_llama_cpp_python = pytest.mark.skipif(not HAS_LLAMA_CPP_PYTHON, reason="llama-cpp-python is not installed "
                                            "(pip install 'tsg[llamacpp]', or make clients)")


def told(capsys, model_dir, *words, backend="llama.cpp"):
    """The stories `tsg generate` wrote to a JSON lines file, with the backend given."""
    output = model_dir.parent / f"stories-{backend}-{model_dir.name}.jsonl"
    code, _, err = run_tsg(["generate", "--model", model_dir, "--backend", backend, "--output", output, *words],
                           capsys)
    assert code == 0, err
    return [json.loads(line) for line in output.read_text().splitlines()]


@needs_llama_cpp_python
def test_llama_cpp_backend_tells_the_transformers_greedy_story(model_dir, capsys):
    for gguf_file in model_dir.glob("*-f32.gguf"):
        gguf_file.unlink()
    prompts = model_dir.parent / "prompts.txt"
    prompts.write_text("Once upon a time\nTom and Sue went to the park. They\n\"Look!\" said Lily, 3 times.\n")
    words = ["--prompts_file", prompts, "--greedy", "--max_new_tokens", "40"]
    fast = told(capsys, model_dir, *words)
    assert (model_dir / f"{model_dir.name}-f32.gguf").is_file()  # exported once, beside the weights
    slow = told(capsys, model_dir, *words, backend="transformers")
    assert [row["story"] for row in fast] == [row["story"] for row in slow]
    assert (fast[0]["backend"], fast[0]["model"], fast[0]["device"]) == ("llama.cpp", str(model_dir), "cpu")
    assert len(fast[0]["story"].split()) > 15
    from_file = told(capsys, model_dir / f"{model_dir.name}-f32.gguf", *words)  # the file alone, its own tokenizer
    assert [row["story"] for row in from_file] == [row["story"] for row in slow]


@needs_llama_cpp_python
def test_llama_cpp_backend_exports_again_when_the_model_changed(model_dir, capsys):
    told(capsys, model_dir, "-q", "Once", "--greedy", "--max_new_tokens", "5")
    path = model_dir / f"{model_dir.name}-f32.gguf"
    weights = (model_dir / "model.safetensors").stat().st_mtime
    os.utime(path, (weights - 1, weights - 1))  # older than the weights: as if the run was trained again
    code, _, err = run_tsg(["generate", "--model", model_dir, "--backend", "llama.cpp", "-q", "Once", "--greedy",
                            "--max_new_tokens", "5"], capsys)
    assert code == 0 and "(the model changed since)" in err, err
    assert path.stat().st_mtime > (model_dir / "model.safetensors").stat().st_mtime


@needs_llama_cpp_python
def test_llama_cpp_backend_applies_settings_as_transformers_does(model_dir):
    """A repetition penalty (over the prompt too), a text end marker (the story cut there, not ended), banned words
    and a start marker, the length limit of the model's context: the same greedy stories, token counts and endings
    on both backends."""
    from tsg import llamacpp

    model, tokenizer = load_model(str(model_dir), device="cpu")
    gguf_model = llamacpp.load_gguf_model(str(model_dir), device="cpu")
    prompts = ["Once upon a time", "Tom and Sue", "The sun"]
    try:
        for settings in (Settings(do_sample=False, max_new_tokens=150), Settings(do_sample=False, repetition_penalty=1.5),
                         Settings(do_sample=False, end_marker=".", max_new_tokens=60),
                         Settings(do_sample=False, banned_words=["the", "was"], start_marker="Once upon a time,")):
            expected = tell_stories(model, tokenizer, prompts, settings)
            assert llamacpp.tell_stories(gguf_model, prompts, settings) == expected, settings
            if settings.end_marker:
                assert not any(story.ended for story in expected)
    finally:
        gguf_model.close()


@needs_llama_cpp_python
def test_llama_cpp_backend_samples_by_seed_and_keeps_banned_words_out(model_dir, capsys):
    words = ["-q", "Once upon a time", "-n", "3", "--max_new_tokens", "60", "--seed", "5"]
    first = told(capsys, model_dir, *words)
    assert first == told(capsys, model_dir, *words)  # same seed, same stories
    assert len({row["story"] for row in first}) == 3  # each story its own draw
    common = max({w for row in first for w in re.findall(r"[a-z]+", row["story"].lower()[16:]) if len(w) > 2},
                 key=lambda w: sum(row["story"].lower()[16:].count(w) for row in first))
    banned = told(capsys, model_dir, *words, "--banned_words", common)
    for row in banned:
        assert not re.search(rf"\b{common}\b", row["story"][16:], re.IGNORECASE), (common, row["story"])


@needs_llama_cpp_python
def test_llama_cpp_backend_streams_the_story_it_tells(model_dir, capsys):
    [row] = told(capsys, model_dir, "-q", "Once upon a time", "--greedy", "--max_new_tokens", "30")
    code, out, err = run_tsg(["generate", "--model", model_dir, "--backend", "llama.cpp", "-q", "Once upon a time",
                              "--greedy", "--max_new_tokens", "30"], capsys)
    assert code == 0 and out.strip() == row["story"], err


@pytest.mark.parametrize("words, message", [
    (["--num_beams", "2", "--greedy"], "num_beams 2: the llama.cpp backend has no beam search"),
    (["--quantization", "8bit"], "quantization 8bit: llama.cpp runs the GGUF's own weights"),
    (["--compile", "true"], "compile: a transformers backend option"),
    (["--model", "nothere.gguf"], "nothere.gguf: no such file"),
])
def test_llama_cpp_backend_bad_options(model_dir, words, message, capsys):
    code, _, err = run_tsg(["generate", "--model", model_dir, "--backend", "llama.cpp", *words], capsys)
    assert code == 2 and message in error_line(err, "generate")


def test_llama_cpp_backend_without_llama_cpp_python_says_how_to_install(model_dir, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    code, _, err = run_tsg(["generate", "--model", model_dir, "--backend", "llama.cpp"], capsys)
    assert code == 2 and "pip install 'tsg[llamacpp]'" in error_line(err, "generate")
