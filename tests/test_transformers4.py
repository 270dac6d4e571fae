"""The folders tsg saves load in transformers 4.57 (the newest 4.x) and tell the same greedy story there.

Each kind of folder is trained for two steps as `tsg train` saves it: configs/tiny_cpu.json's Llama (as shipped, and
with grouped-query attention and a RoPE theta and linear scaling set through config_overrides), a GPT-2 from
scratch, the TinyStories GPT-Neo preset (configs/tinystories_1m.json), and adapter runs merged into plain models (a
4-bit QLoRA run on a GPT-2 stand-in for distilgpt2 whose tokenizer comes in the hub's layout, vocab.json and
merges.txt, merged by `tsg merge`; a QLoRA run on that Llama, as configs/qlora_cpu.json, merged by tsg.adapter.merge).
A transformers 4.57 python then loads each with AutoModelForCausalLM / AutoTokenizer and must give, against tsg under
transformers 5:

- tsg's greedy story (tsg.generation.tell_stories): the same 40 new token ids and the same text;
- the same logits on a sequence as long as the context allows (past GPT-Neo's 256-token local window);
- the same model class, RoPE settings, special tokens and generation config ids; a fast tokenizer of the class
  tokenizer_config.json names, giving tsg's ids on hard strings and decoding them back to the same text.

Every GPT-Neo preset's config also builds the same model there (parameter count, attention layers, window).

Optional: it runs against the transformers 4.57 environment `make clients` builds in $TSG_CLIENTS/transformers4
(default ~/.cache/tsg/clients) and is skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, VOCAB, tiny_cli
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from tsg import adapter, cli, model as models, train
from tsg.config import parse_args
from tsg.generation import load_model, tell_stories

CLIENTS = Path(os.environ.get("TSG_CLIENTS", Path.home() / ".cache" / "tsg" / "clients"))
PYTHON4 = CLIENTS / "transformers4" / "bin" / "python"
pytestmark = pytest.mark.skipif(not PYTHON4.is_file(),
                                reason=f"no transformers 4.57 environment at {PYTHON4} (make clients)")

PROMPT = "Once upon a time"
NEW_TOKENS = 40
HARD_TEXTS = ["Once upon a time", " Once upon a time", "  two  spaces", "new\nlines\n\nhere", "digits 1 22 333 4444",
              "Hello, world! It's 'quoted' (and) [bracketed]...", "Hi . Yes , no ! it 's n't", "café naïve über 😊",
              "\tTab and trailing ", "The end.<|endoftext|>Once"]
GQA_ROPE = {"intermediate_size": 512, "num_key_value_heads": 2, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}}
PRESETS = sorted((REPO / "configs").glob("tinystories_*.json"))
RUN = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
       "--eval_strategy", "no", "--load_best_model_at_end", "false", "--preprocessing_num_workers", "1",
       "--dataloader_num_workers", "0", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true"]

# Runs in the transformers 4.57 python: argv[1] a JSON file of jobs, argv[2] the folder for the logits; prints JSON.
TRANSFORMERS4 = r'''
import json, sys
import torch, transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

jobs, out = json.load(open(sys.argv[1])), sys.argv[2]
results = {"version": transformers.__version__, "folders": {}, "presets": {}}
for name, job in jobs["folders"].items():
    folder = job["folder"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    generation = GenerationConfig.from_pretrained(folder)
    prompt = tokenizer(job["prompt"], return_tensors="pt")
    with torch.no_grad():
        story = model.generate(**prompt, do_sample=False, max_new_tokens=job["new_tokens"],
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        logits = model(input_ids=torch.tensor([job["probe"]])).logits[0]
    save_file({"logits": logits.contiguous()}, f"{out}/{name}.safetensors")
    config = model.config
    hard = [tokenizer(text, add_special_tokens=False).input_ids for text in job["hard_texts"]]
    results["folders"][name] = {
        "model_class": type(model).__name__,
        "tokenizer_class": type(tokenizer).__name__,
        "special": {kind: [getattr(tokenizer, kind + "_token"), getattr(tokenizer, kind + "_token_id")]
                    for kind in ("bos", "eos", "pad", "unk")},
        "generation": [generation.bos_token_id, generation.eos_token_id, generation.pad_token_id],
        "rope": [getattr(config, "rope_theta", None), getattr(config, "rope_scaling", None)],
        "kv_heads": getattr(config, "num_key_value_heads", None),
        "dtype": str(model.dtype),
        "new": story[0, prompt.input_ids.shape[1]:].tolist(),
        "text": tokenizer.decode(story[0], skip_special_tokens=True),
        "hard": hard,
        "decoded": [tokenizer.decode(ids) for ids in hard],
    }
for name, folder in jobs["presets"].items():
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    results["presets"][name] = [model.num_parameters(), config.attention_layers, config.window_size,
                                config.hidden_size, config.num_heads, config.intermediate_size]
print(json.dumps(results))
'''


class GPTNeoTokenizerSize:
    """What build_config reads of the GPT-Neo tokenizer (EleutherAI/gpt-neo-125M, out of reach offline): its length
    and its <|endoftext|> ids."""

    bos_token_id = eos_token_id = pad_token_id = 50256

    def __len__(self):
        return 50257


def run_train(argv) -> None:
    try:
        train.main([str(word) for word in argv])
    except SystemExit as e:
        assert e.code in (0, None), f"tsg train exited {e.code}"


def hub_layout_gpt2(folder: Path, tokenizer) -> Path:
    """A stand-in for distilgpt2 as the hub holds it: a GPT-2 with its tokenizer as vocab.json + merges.txt and a
    tokenizer_config.json of model_max_length only (width 64: bitsandbytes quantizes in blocks of 64)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_layer=2, n_embd=64, n_head=4, n_positions=128,
                                  bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"]), encoding="utf-8")
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, small_txt, tokenizer) -> dict[str, Path]:
    """Each kind of folder, trained two steps and saved by tsg (adapter runs merged)."""
    root = tmp_path_factory.mktemp("transformers4")
    tiny_cpu = [REPO / "configs" / "tiny_cpu.json", "--train_file", small_txt, "--validation_split_percentage", "0"]
    run_train([*tiny_cpu, *RUN, "--output_dir", root / "llama"])
    run_train([*tiny_cpu, *RUN, "--config_overrides", json.dumps(GQA_ROPE), "--save_steps", "2",
               "--output_dir", root / "llama_gqa_rope"])
    run_train(tiny_cli(small_txt, root / "gpt2", max_steps=2))
    run_train([PRESETS[0], "--tokenizer_name", "none", "--vocab_size", VOCAB, "--train_file", small_txt,
               "--max_train_samples", "40", "--sample_steps", "0", *RUN, "--output_dir", root / "gpt_neo"])
    base = hub_layout_gpt2(root / "distilgpt2", tokenizer)
    run_train(tiny_cli(small_txt, root / "qlora_gpt2", "--load_in_4bit", "true", model_type=None,
                       num_hidden_layers=None, hidden_size=None, num_attention_heads=None, vocab_size=None,
                       model_name_or_path=base, use_peft="true", lora_r=8, lora_alpha=16, lora_dropout=0.0,
                       learning_rate=1e-2, max_steps=2))
    cli.main(["merge", str(root / "qlora_gpt2"), str(root / "qlora_gpt2_merged")])
    run_train([REPO / "configs" / "qlora_cpu.json", "--model_name_or_path", root / "llama_gqa_rope", "--train_file",
               small_txt, "--validation_split_percentage", "0", *RUN, "--output_dir", root / "qlora_llama"])
    adapter.merge(root / "qlora_llama", root / "qlora_llama_merged")
    return {"llama": root / "llama", "llama_gqa_rope": root / "llama_gqa_rope", "gpt2": root / "gpt2",
            "gpt_neo": root / "gpt_neo", "qlora_gpt2_merged": root / "qlora_gpt2_merged",
            "qlora_llama_merged": root / "qlora_llama_merged"}


KINDS = ["llama", "llama_gqa_rope", "gpt2", "gpt_neo", "qlora_gpt2_merged", "qlora_llama_merged"]


def probe_ids(model) -> list[int]:
    """Token ids to read logits on: as many as the context holds, up to 300 (past GPT-Neo's local window)."""
    length = min(300, models.context_length(model.config))
    return torch.randint(1, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def tsg_side(folders) -> dict[str, dict]:
    """What tsg tells and computes with each folder under transformers 5."""
    sides = {}
    for name, folder in folders.items():
        model, tokenizer = load_model(str(folder), device="cpu")
        story = tell_stories(model, tokenizer, PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS)[0]
        prompt = tokenizer(PROMPT, return_tensors="pt")
        probe = probe_ids(model)
        with torch.inference_mode():
            new = model.generate(**prompt, do_sample=False, max_new_tokens=NEW_TOKENS,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            logits = model(input_ids=torch.tensor([probe])).logits[0]
        sides[name] = dict(model=model, tokenizer=tokenizer, story=story, probe=probe, logits=logits,
                           new=new[0, prompt.input_ids.shape[1]:].tolist())
    return sides


@pytest.fixture(scope="module")
def preset_folders(tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """Each GPT-Neo preset's config.json as tsg builds it (the GPT-Neo tokenizer's size, as released), with the
    parameter count of its model under transformers 5."""
    root = tmp_path_factory.mktemp("presets")
    presets = {}
    for path in PRESETS:
        story, _ = parse_args([str(path)])
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(models.build_config(story, GPTNeoTokenizerSize()))
        model.config.save_pretrained(root / path.stem)
        presets[path.stem] = (root / path.stem, model.num_parameters())
    return presets


@pytest.fixture(scope="module")
def transformers4(folders, tsg_side, preset_folders, tmp_path_factory) -> dict:
    """The 4.57 python's results on every folder and preset, from one run; its logits under "logits"."""
    work = tmp_path_factory.mktemp("run4")
    jobs = {"folders": {name: {"folder": str(folders[name]), "prompt": PROMPT, "new_tokens": NEW_TOKENS,
                               "probe": tsg_side[name]["probe"], "hard_texts": HARD_TEXTS} for name in folders},
            "presets": {name: str(folder) for name, (folder, _) in preset_folders.items()}}
    (work / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # 4.57 alone, never the venv's
    done = subprocess.run([str(PYTHON4), "-c", TRANSFORMERS4, str(work / "jobs.json"), str(work)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["version"].startswith("4.57."), results["version"]
    for name in results["folders"]:
        results["folders"][name]["logits"] = load_file(str(work / f"{name}.safetensors"))["logits"]
    return results


@pytest.mark.parametrize("kind", KINDS)
def test_same_greedy_story(kind, tsg_side, transformers4):
    ours, theirs = tsg_side[kind], transformers4["folders"][kind]
    story = ours["story"]
    assert story.tokens >= 20, story  # long enough to tell models apart
    assert story.continuation == ours["tokenizer"].decode(ours["new"][:story.tokens], skip_special_tokens=True).strip()
    assert theirs["new"] == ours["new"]
    assert theirs["text"].strip() == story.text


@pytest.mark.parametrize("kind", KINDS)
def test_same_logits(kind, tsg_side, transformers4):
    ours, theirs = tsg_side[kind]["logits"], transformers4["folders"][kind]["logits"]
    assert theirs.shape == ours.shape
    gap = (theirs - ours).abs().max().item()
    assert gap <= 1e-5 + 1e-5 * ours.abs().max().item(), f"logits differ by up to {gap:.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_same_model_tokenizer_and_generation_config(kind, folders, tsg_side, transformers4):
    model, tokenizer = tsg_side[kind]["model"], tsg_side[kind]["tokenizer"]
    theirs = transformers4["folders"][kind]
    assert theirs["model_class"] == type(model).__name__ and theirs["dtype"] == str(model.dtype)
    named = json.loads((folders[kind] / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert theirs["tokenizer_class"] == named.removesuffix("Fast") + "Fast"  # the fast one, reading tokenizer.json
    assert theirs["special"] == {role: [getattr(tokenizer, role + "_token"), getattr(tokenizer, role + "_token_id")]
                                 for role in ("bos", "eos", "pad", "unk")}
    assert theirs["special"]["eos"] == ["<|endoftext|>", tokenizer.eos_token_id]
    generation = model.generation_config
    assert theirs["generation"] == [generation.bos_token_id, generation.eos_token_id, generation.pad_token_id]
    assert theirs["kv_heads"] == getattr(model.config, "num_key_value_heads", None)


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_gives_tsgs_ids(kind, tsg_side, transformers4):
    tokenizer, theirs = tsg_side[kind]["tokenizer"], transformers4["folders"][kind]
    for text, ids, decoded in zip(HARD_TEXTS, theirs["hard"], theirs["decoded"]):
        assert ids == tokenizer(text, add_special_tokens=False).input_ids, text
        assert decoded == tokenizer.decode(ids) == text, text


@pytest.mark.parametrize("kind", ["llama", "llama_gqa_rope", "qlora_llama_merged"])
def test_rope_settings_reach_transformers4(kind, folders, tsg_side, transformers4):
    """transformers 4.x reads rope_theta and rope_scaling, not transformers 5's rope_parameters: without them it
    falls back to a theta of 10,000 and no scaling."""
    rope = dict(tsg_side[kind]["model"].config.rope_parameters)
    theta, scaling = transformers4["folders"][kind]["rope"]
    assert theta == rope.pop("rope_theta")
    assert scaling == (None if rope["rope_type"] == "default" else rope)
    if kind != "llama":  # config_overrides' settings, not 4.x's defaults
        assert (theta, scaling) == (500000.0, {"rope_type": "linear", "factor": 2.0})
    if kind == "llama_gqa_rope":  # the Trainer's checkpoints carry them too
        checkpoint = json.loads((folders[kind] / "checkpoint-2" / "config.json").read_text())
        assert (checkpoint["rope_theta"], checkpoint["rope_scaling"]) == (theta, scaling)


@pytest.mark.parametrize("name", [path.stem for path in PRESETS])
def test_gpt_neo_presets_build_the_same_model(name, preset_folders, transformers4):
    folder, parameters = preset_folders[name]
    config = AutoConfig.from_pretrained(folder)
    assert transformers4["presets"][name] == [parameters, config.attention_layers, config.window_size,
                                              config.hidden_size, config.num_heads, config.intermediate_size]
