"""A model folder as a GGUF file for llama.cpp, laid out as llama.cpp's own converter lays it out, and checked.

    path, check = write_gguf("runs/tiny_cpu", "runs/tiny_cpu/model-f32.gguf", outtype="f32")

Architectures: Llama (tiny_cpu.json: tied embeddings, grouped-query attention) and GPT-2 (the GPT-2 family,
distilgpt2, GPT-2 from scratch); an adapter run is merged first, in full precision (tsg.adapter). Tensor names come
from the gguf package's name map; GPT-2's Conv1D weights are transposed to [out, in]; Llama's q/k rows are permuted
into llama.cpp's rotary layout (pairs of consecutive values, where transformers rotates halves); a tied output layer
is left out, so that llama.cpp reuses the token embeddings.

The tokenizer is written as llama.cpp's `gpt2` model (the byte-level vocabulary, merges and special ids) with the
pre-tokenizer `gpt-2`, but only after checking that the saved tokenizer is GPT-2's byte-level BPE (ByteLevel with
the GPT-2 regex, no normaliser, no byte fallback): llama.cpp picks its pre-tokenizer by that name, and any other
tokenizer would be split differently there. The file is written beside its target and kept only when the check
passes (`check_gguf`): the GGUF read back gives the same next-token logits on probe texts, within the outtype's
tolerance, and the same token ids.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tsg.files import UserError, one_line, replaced_atomically
from tsg.generation import resolve_model_dir

OUTTYPES = ("f32", "f16", "q8_0")
ARCHITECTURES = {"llama": "LLAMA", "gpt2": "GPT2"}  # transformers model_type -> gguf.MODEL_ARCH
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's byte-level pre-tokenizer ("gpt2" is refused at load)
PROBES = ("Once upon a time, there was a little girl named Lily.",
          "Tom said, \"Look at the 3 big dogs!\"\nThey ran to the park.",
          "  The sun was hot.   It was a café day: 1, 2, 10 and 100 birds.")
# |logit difference| allowed, as a share of the largest |logit|: the rounding of each outtype's weights
# (measured on tiny_cpu.json's 300-step model, largest |logit| 9.6: f32 0, f16 2.1e-3, q8_0 3.7e-2)
TOLERANCE = {"f32": 1e-5, "f16": 1e-3, "q8_0": 1e-2}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """What check_gguf compared: the largest |logit| difference over the probes' next tokens, the tolerance it was
    held to, and whether every probe's token ids were the same."""

    max_abs_logit_diff: float
    tolerance: float
    same_tokens: bool
    probes: int


def check_byte_level_gpt2(tokenizer) -> None:
    """A UserError naming what differs when `tokenizer` is not GPT-2's byte-level BPE (what llama.cpp's `gpt-2`
    pre-tokenizer reproduces)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{tokenizer.name_or_path}: not a fast (tokenizers) tokenizer: llama.cpp's gpt2 vocabulary "
                        "needs GPT-2's byte-level BPE")
    spec = json.loads(backend.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    differences = []
    if spec.get("normalizer") is not None:
        differences.append(f"it has a normaliser ({spec['normalizer'].get('type')})")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        differences.append(f"its pre-tokenizer is {pre.get('type')}, not ByteLevel with the GPT-2 regex")
    elif pre.get("add_prefix_space"):
        differences.append("its pre-tokenizer adds a prefix space")
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        differences.append(f"its model is {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}"
                           ", not byte-level BPE")
    if differences:
        raise UserError(f"{tokenizer.name_or_path}: not GPT-2's byte-level tokenizer ({'; '.join(differences)}): "
                        "llama.cpp would split its text differently")


def _gguf_arch(config) -> str:
    if config.model_type not in ARCHITECTURES:
        raise UserError(f"model_type {config.model_type!r}: llama.cpp runs no such GGUF here; the architectures "
                        f"that export are {', '.join(ARCHITECTURES)}")
    if config.model_type == "gpt2" and config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"activation_function {config.activation_function!r}: llama.cpp's GPT-2 uses the tanh GELU")
    if config.model_type == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
                                         or getattr(config, "hidden_act", "silu") != "silu"):
        raise UserError("a Llama with biases or an activation other than silu: llama.cpp's Llama runs neither")
    return ARCHITECTURES[config.model_type]


def hyperparameters(config) -> dict[str, int | float]:
    """The architecture's hyperparameters as llama.cpp reads them: GGUF key (gguf.Keys) -> value."""
    import gguf

    keys, attention, rope = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    if config.model_type == "gpt2":
        values = {keys.CONTEXT_LENGTH: config.n_positions, keys.EMBEDDING_LENGTH: config.n_embd,
                  keys.FEED_FORWARD_LENGTH: config.n_inner or 4 * config.n_embd, keys.BLOCK_COUNT: config.n_layer,
                  attention.HEAD_COUNT: config.n_head, attention.LAYERNORM_EPS: config.layer_norm_epsilon}
    else:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 1e4))
        values = {keys.CONTEXT_LENGTH: config.max_position_embeddings, keys.EMBEDDING_LENGTH: config.hidden_size,
                  keys.FEED_FORWARD_LENGTH: config.intermediate_size, keys.BLOCK_COUNT: config.num_hidden_layers,
                  keys.VOCAB_SIZE: config.vocab_size, attention.HEAD_COUNT: config.num_attention_heads,
                  attention.HEAD_COUNT_KV: config.num_key_value_heads,
                  rope.DIMENSION_COUNT: getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                  rope.FREQ_BASE: float(theta), attention.LAYERNORM_RMS_EPS: config.rms_norm_eps}
    return {key.format(arch=config.model_type): value for key, value in values.items()}


def _write_tokenizer(writer, tokenizer, folder: str, vocab_size: int) -> None:
    """llama.cpp's gpt2 vocabulary, for a tokenizer check_byte_level_gpt2 has passed."""
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.CONTROL if i in special
             else gguf.TokenType.NORMAL for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)
    writer.add_add_bos_token(False)  # tsg's stories start without a BOS token, as trained
    writer.add_add_eos_token(False)


def llama_cpp_tensors(model) -> dict[str, torch.Tensor]:
    """The model's weights as llama.cpp lays them out, by HF name: Conv1D transposed, q/k permuted, a tied output
    layer left out."""
    config = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # buffers, not weights
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensor = tensor.detach().float()
        if config.model_type == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            tensor = tensor.t()
        if config.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if name.endswith("q_proj.weight") else config.num_key_value_heads
            tensor = tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *tensor.shape[1:]).swapaxes(1, 2)
            tensor = tensor.reshape(-1, *tensor.shape[3:])
        tensors[name] = tensor.contiguous()
    return tensors


def _add_tensors(writer, model, arch: str, outtype: str) -> None:
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), model.config.num_hidden_layers)
    for hf_name, tensor in llama_cpp_tensors(model).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{hf_name}: no llama.cpp tensor of that name in the gguf package's map for {arch}")
        data = tensor.numpy()
        if data.ndim < 2 or outtype == "f32":
            writer.add_tensor(name, data.astype(np.float32))
        elif outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            quantized = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:  # f16, and q8_0 tensors whose rows do not split into its 32-value blocks
            writer.add_tensor(name, data.astype(np.float16))


def load_full_precision(name: str):
    """(model, tokenizer, folder): a saved folder, hub model or adapter run (merged first) in float32."""
    folder = resolve_model_dir(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"{name}: no model could be loaded ({one_line(e, 200)})") from None
    return model, tokenizer, folder


def write_gguf(name: str, output: str | Path, outtype: str = "f32") -> tuple[Path, Check]:
    """Write the model `name` names as a GGUF file at `output`, kept only when check_gguf passes."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"outtype: expected one of {', '.join(OUTTYPES)}, got {outtype!r}")
    model, tokenizer, folder = load_full_precision(name)
    arch = _gguf_arch(model.config)
    check_byte_level_gpt2(tokenizer)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # written and read back in a folder of its own (a run folder's other files would be read too), then moved
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as work:
        written = Path(work) / output.name
        writer = gguf.GGUFWriter(str(written), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])
        writer.add_name(Path(folder).name)
        for key, value in hyperparameters(model.config).items():
            (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        _write_tokenizer(writer, tokenizer, folder, model.config.vocab_size)
        _add_tensors(writer, model, arch, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        check = check_gguf(written, model, tokenizer, TOLERANCE[outtype])
        with replaced_atomically(output) as tmp:
            os.replace(written, tmp)
    return output, check


def check_gguf(path: Path, model, tokenizer, tolerance: float) -> Check:
    """The GGUF at `path` against `model` and `tokenizer`: its hyperparameters read back are the model's; its
    weights, read back by transformers' GGUF loader (which undoes llama.cpp's layout) into the model's config, give
    next-token logits on PROBES within `tolerance` x the largest |logit|; its tokenizer gives the same token ids.
    A UserError when anything differs."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    for key, value in hyperparameters(model.config).items():
        found = fields[key].parts[fields[key].data[0]].tolist()[0] if key in fields else None
        if found is None or not np.isclose(found, value, rtol=1e-6):
            raise UserError(f"{path.name}: {key} reads back as {found}, not {value}; nothing kept")
    try:
        back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=model.config,
                                                    dtype=torch.float32).eval()
        back_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{path.name}: the written GGUF does not read back ({one_line(e, 200)}); nothing kept") from None
    worst, scale, same = 0.0, 0.0, True
    for text in PROBES:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        same &= back_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        with torch.inference_mode():
            expected = model(input_ids=torch.tensor([ids])).logits[0, -1]
            found = back(input_ids=torch.tensor([ids])).logits[0, -1]
        worst = max(worst, (found - expected).abs().max().item())
        scale = max(scale, expected.abs().max().item())
    check = Check(worst, tolerance * scale, same, len(PROBES))
    if not same:
        raise UserError(f"{path.name}: its tokenizer splits the probe texts differently; nothing kept")
    if not worst <= check.tolerance:
        raise UserError(f"{path.name}: next-token logits differ by {worst:.3g} > {check.tolerance:.3g} from the "
                        "model's; nothing kept")
    return check
