"""A model folder as a file that runs outside Python, checked before it is kept: GGUF for llama.cpp, laid out as
llama.cpp's own converter lays it out, and ONNX for ONNX Runtime and transformers.js.

    path, check = write_gguf("runs/tiny_cpu", "runs/tiny_cpu/model-f32.gguf", outtype="f32")
    path, check = write_onnx("runs/tiny_cpu", "runs/tiny_cpu")          # runs/tiny_cpu/onnx/model.onnx

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

The ONNX graph is exported by torch's own exporter (torch.export, then onnxscript) from the model as one decoding
step sees it: `input_ids`, `attention_mask`, `position_ids` and each layer's `past_key_values.N.key/value` in,
`logits` and each layer's `present.N.key/value` out (the names optimum and transformers.js use), every length
dynamic, so that one graph reads a prompt (an empty past) and then one token a step. It is written in the
transformers.js folder layout (`DIR/onnx/model.onnx` beside config.json and the tokenizer files) and kept only when
ONNX Runtime, reading a probe text and then decoding the model's greedy continuation through the past key values,
gives logits within ONNX_TOLERANCE of the model's at every position, and the folder's tokenizer.json the same ids.
"""

from __future__ import annotations

import inspect
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
from tsg.generation import check_model_name, resolve_model_dir
from tsg.model import check_remote_code, keep_transformers4_keys, refused_remote_code

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
    steps: int = 0  # positions compared per probe after the prompt, one decoding step each (ONNX: through the past)


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


def _write_tokenizer(writer, tokenizer, folder: str | Path, vocab_size: int) -> None:
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
    check_remote_code(folder, False, option=None)  # an export runs no code from a model folder
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        refused_remote_code(e, name, option=None)
        raise UserError(f"{name}: no model could be loaded ({one_line(e, 200)})") from None
    return model, tokenizer, folder


def default_gguf_path(name: str, outtype: str = "f32") -> Path:
    """Where `tsg export` writes a local model's GGUF, and where `tsg generate --backend llama.cpp` looks for it:
    MODEL/<name>-<outtype>.gguf (an adapter run's beside its adapter)."""
    folder = Path(name).expanduser().resolve()
    return folder / f"{folder.name}-{outtype}.gguf"


def write_gguf(name: str, output: str | Path, outtype: str = "f32") -> tuple[Path, Check]:
    """Write the model `name` names as a GGUF file at `output`, kept only when check_gguf passes."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"outtype: expected one of {', '.join(OUTTYPES)}, got {outtype!r}")
    model, tokenizer, folder = load_full_precision(name)
    arch = _gguf_arch(model.config)
    check_byte_level_gpt2(tokenizer)
    output = Path(output).expanduser()
    existing = next(p for p in output.parents if p.exists())  # built beside the target, then renamed
    try:
        # written and read back in a folder of its own (a run folder's other files would be read too), then moved
        with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=existing) as work:
            written = Path(work) / output.name
            tokenizer.save_pretrained(Path(work) / "tokenizer")  # its merges and special ids, whatever the source
            writer = gguf.GGUFWriter(str(written), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])
            writer.add_name(Path(folder).name)
            for key, value in hyperparameters(model.config).items():
                (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
            writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
            _write_tokenizer(writer, tokenizer, Path(work) / "tokenizer", model.config.vocab_size)
            _add_tensors(writer, model, arch, outtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            check = check_gguf(written, model, tokenizer, TOLERANCE[outtype])
            with replaced_atomically(output) as tmp:
                os.replace(written, tmp)
    except OSError as e:
        raise UserError(f"output {output}: cannot write it ({e.strerror or e})") from None
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


# --- ONNX ---

ONNX_FILE = "onnx/model.onnx"  # the transformers.js layout: the graph under onnx/, config and tokenizer beside it
ONNX_TOLERANCE = 1e-4  # |logit difference| over the largest |logit|: ONNX Runtime's kernels sum in another order
ONNX_CHECK_STEPS = 16  # greedy tokens decoded one at a time through the past key values, per probe
EXTERNAL_DATA_BYTES = 1 << 30  # larger weights go to a file beside the graph (a protobuf holds < 2 GB)
EXTERNAL_DATA = "model.onnx_data"  # the name transformers.js and optimum look for
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_config.json")


class DecodingStep(torch.nn.Module):
    """The model as one decoding step runs it, with the KV cache as flat tensors (key, value per layer) so that it
    exports as graph inputs and outputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            **{cache_keyword(self.model): cache}, use_cache=True)
        return (output.logits, *[t for layer in output[1].layers for t in (layer.keys, layer.values)])


def cache_keyword(model) -> str:
    """The forward's KV cache argument: `cache` (transformers >= 5.24) or `past_key_values` (earlier)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def onnx_names(layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the exported graph."""
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def empty_past(model) -> list[torch.Tensor]:
    """Each layer's key and value for no tokens yet ([batch 1, kv heads, 0, head dim]), shaped by a forward pass."""
    with torch.inference_mode():
        cache = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)[1]  # logits, then the cache
    return [t[:, :, :0].clone() for layer in cache.layers for t in (layer.keys, layer.values)]


def export_onnx_graph(model, path: Path) -> None:
    """torch.onnx.export (the dynamo exporter) of DecodingStep(model) to `path`, batch and lengths dynamic."""
    import warnings

    import onnx_ir

    # optimum's names for the dynamic axes
    batch, sequence, past_sequence = (torch.export.Dim(n) for n in ("batch_size", "sequence_length",
                                                                      "past_sequence_length"))
    past = [torch.randn(2, t.shape[1], 5, t.shape[3]) for t in empty_past(model)]  # batch 2, 5 past tokens
    inputs = (torch.randint(0, model.config.vocab_size, (2, 3)), torch.ones(2, 8, dtype=torch.long),
              torch.arange(5, 8).expand(2, 3), past)
    shapes = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
              "position_ids": {0: batch, 1: sequence}, "past": [{0: batch, 2: past_sequence}] * len(past)}
    input_names, output_names = onnx_names(len(past) // 2)
    exporter_log = logging.getLogger("torch.onnx")  # it warns of every torchvision operator it cannot register
    level = exporter_log.level
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        exporter_log.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(DecodingStep(model).eval(), inputs, dynamo=True, dynamic_shapes=shapes,
                                        input_names=input_names, output_names=output_names, optimize=True,
                                        verbose=False)
        except Exception as e:  # torch.export's many error types: the model's forward is not exportable
            raise UserError(f"model_type {model.config.model_type!r}: torch's ONNX exporter could not export it "
                            f"({one_line(e, 200)})") from None
        finally:
            exporter_log.setLevel(level)
    mask = program.model.graph.inputs[1]  # the exporter names the derived length itself
    mask.shape = onnx_ir.Shape([mask.shape[0], "past_sequence_length + sequence_length"])
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    onnx_ir.save(program.model, path, external_data=EXTERNAL_DATA if big else None)


def onnx_session(path: str | Path):
    """An ONNX Runtime session of an exported graph, on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session, ids: list[int], past: list[np.ndarray], start: int = 0):
    """(logits [len(ids), vocab], present): one call of the exported graph on `ids`, after `start` tokens in `past`."""
    end = start + len(ids)
    feed = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, end), dtype=np.int64),
            "position_ids": np.arange(start, end, dtype=np.int64)[None]}
    names = [i.name for i in session.get_inputs()][3:]
    output = session.run(None, feed | dict(zip(names, past)))
    return output[0][0], output[1:]


def onnx_greedy(session, ids: list[int], max_new_tokens: int, eos_ids=()) -> list[int]:
    """The greedy continuation of `ids` by an exported graph under ONNX Runtime: the prompt in one call, then one
    token a call through the past key values (how ONNX Runtime users and transformers.js decode)."""
    past = [np.zeros((1, x.shape[1], 0, x.shape[3]), np.float32) for x in session.get_inputs()[3:]]  # nothing yet
    new, feed, start = [], list(ids), 0
    for _ in range(max_new_tokens):
        logits, past = onnx_logits(session, feed, past, start)
        start += len(feed)
        token = int(logits[-1].argmax())
        new.append(token)
        if token in eos_ids:
            break
        feed = [token]
    return new


def write_onnx(name: str, output: str | Path | None = None) -> tuple[Path, Check]:
    """Export the model `name` names as `output`/onnx/model.onnx (default: in the model's own folder, an adapter
    run's merged one), with its config, generation config and tokenizer saved beside it when `output` is another
    folder (a folder that holds no other model), so that the folder loads by itself; kept only when check_onnx
    passes. Everything is built in a temporary folder and moved into place once checked: a failed export leaves
    nothing behind."""
    try:
        import onnx  # noqa: F401
        import onnx_ir  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"format onnx: needs the onnx extra ({e.name} is missing): pip install 'tsg[onnx]'") from None
    if output is None and check_model_name(name) is None:
        raise UserError(f"output: required when model is a hub name ({name})")
    model, tokenizer, folder = load_full_precision(name)
    output = Path(output if output is not None else folder).expanduser()
    own = Path(folder).is_dir() and output.resolve() == Path(folder).resolve()
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output}: not a folder (the ONNX export is a folder: {ONNX_FILE} and the model's "
                        "config and tokenizer)")
    if not own and output.is_dir() and any((output / f).exists() for f in WEIGHT_FILES):
        raise UserError(f"output {output}: holds a model of its own; export into a new folder")
    existing = next(p for p in (output, *output.parents) if p.exists())  # built beside the target, then renamed
    try:
        with tempfile.TemporaryDirectory(prefix=".tsg-onnx.", dir=existing) as work:
            work = Path(work)
            (work / ONNX_FILE).parent.mkdir()
            export_onnx_graph(model, work / ONNX_FILE)
            if not own:
                keep_transformers4_keys(model.config)  # transformers.js reads rope_theta, as transformers 4 does
                model.config.save_pretrained(work)
                model.generation_config.save_pretrained(work)
                tokenizer.save_pretrained(work)
            elif not (output / "tokenizer.json").is_file():  # a folder in the hub's layout: the file its users read
                tokenizer.backend_tokenizer.save(str(work / "tokenizer.json"))
            tokenizer_file = work / "tokenizer.json" if (work / "tokenizer.json").is_file() else output / "tokenizer.json"
            check = check_onnx(work / ONNX_FILE, model, tokenizer, tokenizer_file)
            output.mkdir(parents=True, exist_ok=True)
            for item in sorted(work.iterdir()):
                with replaced_atomically(output / item.name) as tmp:
                    os.replace(item, tmp)
    except OSError as e:
        raise UserError(f"output {output}: cannot write it ({e.strerror or e})") from None
    return output / ONNX_FILE, check


def check_onnx(path: Path, model, tokenizer, tokenizer_file: Path, tolerance: float = ONNX_TOLERANCE) -> Check:
    """The graph at `path` under ONNX Runtime against `model`: for each probe text, the text in one call from an
    empty past, then the model's greedy continuation one token a call through the past key values, gives logits
    within `tolerance` x the largest |logit| at every position; `tokenizer_file` (what ONNX Runtime's users and
    transformers.js read) gives the probe texts' token ids. A UserError when anything differs."""
    from tokenizers import Tokenizer

    session = onnx_session(path)
    saved = Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.is_file() else None
    worst, scale, same = 0.0, 0.0, saved is not None
    for text in PROBES:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        same &= saved is not None and saved.encode(text, add_special_tokens=False).ids == ids
        with torch.inference_mode():
            sequence = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      do_sample=False, max_new_tokens=ONNX_CHECK_STEPS, min_new_tokens=ONNX_CHECK_STEPS,
                                      pad_token_id=tokenizer.eos_token_id or 0)[0].tolist()
            expected = model(input_ids=torch.tensor([sequence])).logits[0].numpy()
        found, past = onnx_logits(session, ids, [np.zeros(t.shape, np.float32) for t in empty_past(model)])
        rows = [found]
        for start in range(len(ids), len(sequence) - 1):
            step, past = onnx_logits(session, [sequence[start]], past, start)
            rows.append(step)
        worst = max(worst, float(np.abs(np.concatenate(rows) - expected[:len(sequence) - 1]).max()))
        scale = max(scale, float(np.abs(expected).max()))
    check = Check(worst, tolerance * scale, same, len(PROBES), ONNX_CHECK_STEPS - 1)
    if not same:
        raise UserError(f"{tokenizer_file}: {'missing' if saved is None else 'splits the probe texts differently'}; "
                        "nothing kept")
    if not worst <= check.tolerance:
        raise UserError(f"{path.name}: ONNX Runtime's logits differ by {worst:.3g} > {check.tolerance:.3g} from the "
                        "model's; nothing kept")
    return check
