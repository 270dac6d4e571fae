"""The tokenizer, the from-scratch model config, loading models, and the promise of isolated packing: a packed
story's logits equal its logits alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SEP, VOCAB, tiny_args
from transformers import AutoTokenizer

from tsg import data, model as models
from tsg.files import UserError

NEO = {"attention_types": [[["global", "local"], 1]], "window_size": 8}


# --- tokenizer ---


def test_trained_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == VOCAB
    eos = tokenizer.convert_tokens_to_ids(SEP)
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == SEP
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.bos_token_id == eos
    assert tokenizer(f"The end.{SEP}", add_special_tokens=False)["input_ids"][-1] == eos
    assert tokenizer(f"The end.{SEP}", add_special_tokens=False)["input_ids"].count(eos) == 1


def test_trained_tokenizer_round_trips_text(tokenizer, sample_stories):
    for story in sample_stories[:20] + ["Ünïcödé — “quotes” 🐱 and\ttabs\n\nnew lines"]:
        ids = tokenizer(story, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == story
    # merges were learnt: the sample needs far fewer tokens than bytes
    text = "\n".join(sample_stories[:50])
    assert len(tokenizer(text)["input_ids"]) < len(text.encode()) / 2


def test_trained_tokenizer_saves_and_reloads(tokenizer, tmp_path, sample_stories):
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == VOCAB and again.eos_token_id == tokenizer.eos_token_id
    for story in sample_stories[:5]:
        assert again(story)["input_ids"] == tokenizer(story)["input_ids"]


def test_train_tokenizer_respects_vocab_size(sample_stories):
    small = models.train_tokenizer(sample_stories[:100], 300)
    assert 257 <= len(small) <= 300 and small.eos_token == SEP


# --- model config ---


def test_build_config_shape_and_token_ids(tokenizer):
    config = models.build_config(tiny_args(block_size=48), tokenizer)
    assert config.model_type == "gpt2"
    assert (config.n_layer, config.n_embd, config.n_head, config.n_positions) == (2, 32, 4, 48)
    assert config.vocab_size == VOCAB
    assert config.eos_token_id == config.bos_token_id == config.pad_token_id == tokenizer.eos_token_id
    config = models.build_config(tiny_args(block_size=48, max_position_embeddings=96), tokenizer)
    assert config.n_positions == 96


def test_build_config_overrides(tokenizer):
    config = models.build_config(tiny_args(model_type="gpt_neo", num_hidden_layers=2, config_overrides=NEO), tokenizer)
    assert config.attention_layers == ["global", "local"] and config.window_size == 8
    assert config.num_layers == 2 and config.hidden_size == 32 and config.num_heads == 4
    config = models.build_config(tiny_args(config_overrides={"n_inner": 48, "activation_function": "gelu"}), tokenizer)
    assert config.n_inner == 48 and config.activation_function == "gelu"


def test_build_config_errors(tokenizer):
    with pytest.raises(UserError, match="not_an_arch"):
        models.build_config(tiny_args(model_type="not_an_arch"), tokenizer)
    with pytest.raises(UserError, match="config_overrides.*'n_bogus'"):
        models.build_config(tiny_args(config_overrides={"n_bogus": 3}), tokenizer)


@pytest.mark.parametrize("overrides", [
    dict(model_type="gpt_neo", num_hidden_layers=2, config_overrides={"attention_types": [[["global"], 5]]}),
    dict(config_overrides={"n_inner": "big"}),  # wrong type for a config field
], ids=["gpt_neo-layers", "wrong-type"])
def test_invalid_model_config_is_a_config_error(tokenizer, overrides):
    with pytest.raises(UserError):
        models.build_config(tiny_args(**overrides), tokenizer)


def test_gpt_neo_layers_alternate_global_and_local_attention_by_default(tokenizer):
    config = models.build_config(tiny_args(model_type="gpt_neo", num_hidden_layers=4), tokenizer)
    assert config.attention_layers == ["global", "local", "global", "local"]
    config = models.build_config(tiny_args(model_type="gpt_neo", num_hidden_layers=3), tokenizer)
    assert config.attention_layers == ["global"] * 3


def test_llama_from_scratch(tokenizer):
    model = models.load_model(tiny_args(model_type="llama", config_overrides={"intermediate_size": 64,
                                                                              "num_key_value_heads": 2}), tokenizer)
    assert model.config.model_type == "llama" and model.config.max_position_embeddings == 64
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, VOCAB)


# --- loading models ---


def test_load_model_from_scratch(tokenizer, tiny_model):
    model = tiny_model(tokenizer, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert model.get_input_embeddings().num_embeddings == VOCAB
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
    assert trainable == total and 20_000 < total < 100_000
    assert tiny_model(tokenizer).config._attn_implementation == models.STORY_ATTENTION  # isolated packing, sdpa


def test_fine_tune_path_loads_local_folder_and_checks_context(tokenizer, tiny_model, tmp_path):
    base = tiny_model(tokenizer, block_size=32)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    args = tiny_args(model_type=None, num_hidden_layers=None, hidden_size=None, num_attention_heads=None,
                     model_name_or_path=str(tmp_path / "base"), block_size=32)
    tok = models.load_tokenizer(args)
    model = models.load_model(args, tok)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)
    with pytest.raises(UserError, match="block_size=64.*32"):
        models.load_model(tiny_args(model_type=None, num_hidden_layers=None, hidden_size=None,
                                    num_attention_heads=None, model_name_or_path=str(tmp_path / "base"),
                                    block_size=64), tok)


def test_fine_tune_grows_embeddings_for_a_bigger_tokenizer(tokenizer, tiny_model, tmp_path, sample_stories):
    small = models.train_tokenizer(sample_stories[:100], 300)
    tiny_model(small, block_size=32).save_pretrained(tmp_path / "base")
    args = tiny_args(model_type=None, num_hidden_layers=None, hidden_size=None, num_attention_heads=None,
                     model_name_or_path=str(tmp_path / "base"), block_size=32)
    model = models.load_model(args, tokenizer)
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)


def test_missing_model_or_tokenizer_is_a_config_error(tmp_path):
    args = tiny_args(model_type=None, num_hidden_layers=None, hidden_size=None, num_attention_heads=None,
                     model_name_or_path=str(tmp_path / "no-such-model"))
    with pytest.raises(UserError, match="model_name_or_path"):
        models.load_tokenizer(args)
    with pytest.raises(UserError, match="no-such-model"):
        models.load_model(args, None)


# --- isolated packing == each story alone ---


def _pack_and_collate(stories, block, packing, pad, attn):
    rows = data.pack_stories(stories, block, packing, pad)
    batch_rows = [{k: v[i] for k, v in rows.items()} for i in range(len(rows["input_ids"]))]
    batch = data.BlockCollator(attn)(batch_rows)
    batch.pop("labels")
    return rows, batch


def _pieces(rows):
    """(row, start, end) of each story piece in isolated rows, from the restarting position ids."""
    out = []
    for r, (pos, mask) in enumerate(zip(rows["position_ids"], rows["attention_mask"])):
        starts = [i for i in range(len(pos)) if pos[i] == 0 and mask[i]] + [int(mask.sum())]
        out += [(r, a, b) for a, b in zip(starts, starts[1:])]
    return out


@pytest.fixture(scope="module")
def short_stories(tokenizer, sample_stories):
    """Three real stories cut to 11, 17 and 23 tokens, each ending in EOS."""
    eos = tokenizer.eos_token_id
    return [tokenizer(s, add_special_tokens=False)["input_ids"][: n - 1] + [eos]
            for s, n in zip(sample_stories[:3], (11, 17, 23))]


MODELS = [("gpt2", "sdpa"), ("gpt2", "eager"), ("gpt_neo", "eager"), ("gpt_neo", None), ("llama", "sdpa"),
          ("llama", "eager")]


def _model(tokenizer, model_type, attn, block):
    overrides = dict(model_type=model_type, block_size=block, attn_implementation=attn)
    if model_type == "gpt_neo":
        overrides.update(num_hidden_layers=2, config_overrides=NEO)
    if model_type == "llama":  # rotary positions: restarted position ids must restart the rotation too
        overrides.update(config_overrides={"intermediate_size": 64, "tie_word_embeddings": True})
    torch.manual_seed(0)
    return models.load_model(tiny_args(**overrides), tokenizer).eval()


@pytest.mark.parametrize("model_type, attn", MODELS, ids=[f"{m}-{a}" for m, a in MODELS])
def test_isolated_packing_matches_stories_alone(tokenizer, short_stories, model_type, attn):
    block = 64
    model = _model(tokenizer, model_type, attn, block)
    rows, batch = _pack_and_collate(short_stories, block, "isolated", tokenizer.pad_token_id,
                                    model.config._attn_implementation)
    assert batch["input_ids"].shape == (1, block) and batch["attention_mask"].dim() == 4
    with torch.no_grad():
        packed = model(**batch).logits
        offset = 0
        for story in short_stories:
            alone = model(input_ids=torch.tensor([story])).logits[0]
            diff = (packed[0, offset: offset + len(story)] - alone).abs().max().item()
            assert diff < 1e-5, f"story at {offset}: max abs diff {diff}"
            offset += len(story)
        # the same rows without isolation (plain concatenation) do not match: the test can tell
        _, concat = _pack_and_collate(short_stories, block, "concat", tokenizer.pad_token_id,
                                      model.config._attn_implementation)
        mixed = model(**concat).logits
        second = short_stories[1]
        alone = model(input_ids=torch.tensor([second])).logits[0]
        start = len(short_stories[0])
        assert (mixed[0, start: start + len(second)] - alone).abs().max().item() > 1e-3


@pytest.mark.parametrize("model_type, attn", [("gpt2", "sdpa"), ("gpt_neo", "eager"), ("llama", "sdpa")])
def test_isolated_pieces_across_rows_match_pieces_alone(tokenizer, short_stories, model_type, attn):
    """Stories split across rows (4 rows, tail padding): every piece equals that piece run alone."""
    block = 20
    stories = short_stories + [short_stories[0]]
    model = _model(tokenizer, model_type, attn, block)
    rows, batch = _pack_and_collate(stories, block, "isolated", tokenizer.pad_token_id, attn)
    assert batch["input_ids"].shape[0] == 4 and not rows["attention_mask"][-1].all()
    pieces = _pieces(rows)
    assert len(pieces) >= len(stories) + 2  # at least two stories were split at a row boundary
    with torch.no_grad():
        packed = model(**batch).logits
        for r, a, b in pieces:
            piece = torch.tensor(rows["input_ids"][r, a:b])[None]
            alone = model(input_ids=piece).logits[0]
            assert (packed[r, a:b] - alone).abs().max().item() < 1e-5, (r, a, b)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_story_by_story_attention_trains_as_the_block_mask(tokenizer, short_stories, model_type, tmp_path,
                                                          monkeypatch):
    """Isolated training on a CPU runs sdpa story by story: the same loss and gradients as sdpa with the 4-D block
    mask, one causal call per story piece, and nothing of it in the saved config."""
    block = 20
    stories = short_stories + [short_stories[0]]
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if model_type == "gpt2" else {
        "intermediate_size": 64, "num_key_value_heads": 2}  # grouped-query attention
    torch.manual_seed(0)
    model = models.load_model(tiny_args(model_type=model_type, block_size=block, config_overrides=no_dropout),
                              tokenizer).train()
    assert model.config._attn_implementation == models.STORY_ATTENTION
    rows = data.pack_stories(stories, block, "isolated", tokenizer.pad_token_id)
    batch = data.BlockCollator(models.STORY_ATTENTION)([{k: v[i] for k, v in rows.items()}
                                                         for i in range(len(rows["input_ids"]))])
    causal_calls = []
    sdpa = models.sdpa_attention_forward
    monkeypatch.setattr(models, "sdpa_attention_forward",
                        lambda *a, is_causal=None, **k: causal_calls.append(is_causal) or sdpa(*a, is_causal=is_causal, **k))
    results = {}
    for attn in ("sdpa", models.STORY_ATTENTION):
        model.set_attn_implementation(attn)
        model.zero_grad()
        causal_calls.clear()
        loss = model(**batch).loss
        loss.backward()
        results[attn] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, list(causal_calls)
    (loss, grads, calls), (story_loss, story_grads, story_calls) = results.values()
    assert story_loss == pytest.approx(loss, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(story_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    segments = int((rows["position_ids"] == 0).sum())  # story pieces, and each pad token on its own
    assert segments > len(_pieces(rows)) > len(stories)
    assert calls == [] and story_calls == [True] * segments * model.config.num_hidden_layers
    model.save_pretrained(tmp_path)
    assert models.STORY_ATTENTION not in (tmp_path / "config.json").read_text()
    for packing in ("concat", "pad"):
        torch.manual_seed(0)
        other = models.load_model(tiny_args(model_type=model_type, packing=packing), tokenizer)
        assert other.config._attn_implementation == "sdpa"


def test_story_by_story_attention_keeps_padding_masked(tokenizer):
    """A left-padded batch in training mode, with no position ids: the stories start where the mask says, so
    real tokens never see the padding (the same logits as sdpa with the mask)."""
    torch.manual_seed(0)
    model = models.load_model(tiny_args(model_type="llama", config_overrides={"intermediate_size": 64}),
                              tokenizer).train()
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    logits = {}
    with torch.no_grad():
        for attn in ("sdpa", models.STORY_ATTENTION):
            model.set_attn_implementation(attn)
            logits[attn] = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[models.STORY_ATTENTION][mask.bool()], logits["sdpa"][mask.bool()],
                               rtol=1e-5, atol=1e-5)


def test_isolated_packing_loss_equals_mean_of_story_losses(tokenizer, short_stories):
    """The training loss on a packed row is the token-weighted loss of its stories alone (no cross-story targets)."""
    model = _model(tokenizer, "gpt2", "sdpa", 64)
    rows = data.pack_stories(short_stories, 64, "isolated", tokenizer.pad_token_id)
    batch = data.BlockCollator("sdpa")([{k: v[0] for k, v in rows.items()}])
    with torch.no_grad():
        packed_loss = model(**batch).loss.item()
        total, count = 0.0, 0
        for story in short_stories:
            ids = torch.tensor([story])
            n = len(story) - 1
            total += model(input_ids=ids, labels=ids).loss.item() * n
            count += n
    assert packed_loss == pytest.approx(total / count, abs=1e-5)
    assert int((np.asarray(rows["labels"]) != -100).sum()) == count  # each story: all but its first token
