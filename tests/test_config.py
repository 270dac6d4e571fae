"""The run config: files in configs/, JSON/YAML parsing, CLI overrides and the errors a user sees."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import REPO

from tsg.config import StoryArguments, load_file, parse_args, write_run_config
from tsg.files import UserError

CONFIG_FILES = sorted(
    p for pattern in ("*.json", "*.yaml", "*.yml") for p in (REPO / "configs").glob(pattern)
)

SCRATCH = ["--model_type", "gpt2", "--train_file", "stories.txt"]


def write_json(path: Path, values: dict) -> Path:
    path.write_text(json.dumps(values, indent=2), encoding="utf-8")
    return path


# --- the shipped configs ---


def test_configs_folder_is_not_empty():
    assert CONFIG_FILES, f"no config files in {REPO / 'configs'}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_every_shipped_config_parses(path):
    story, training = parse_args([str(path)])
    raw = load_file(path)
    assert bool(story.model_name_or_path) != bool(story.model_type)
    expected_dir = raw.get("output_dir") or str(Path("runs") / path.stem)
    assert training.output_dir == expected_dir
    for key in ("block_size", "packing", "learning_rate", "per_device_train_batch_size"):
        if key in raw:
            value = getattr(story, key, None) if hasattr(story, key) else getattr(training, key)
            assert value == raw[key], key
    if story.train_file:  # a local data file named by a shipped config exists in the repo
        assert (REPO / story.train_file).is_file() or Path(story.train_file).is_file(), story.train_file


# --- reading files ---


def test_cli_overrides_file(tmp_path):
    cfg = write_json(tmp_path / "run.json", {"model_type": "gpt2", "train_file": "a.txt", "learning_rate": 0.1,
                                             "max_steps": 5, "block_size": 64, "packing": "pad"})
    story, training = parse_args([str(cfg), "--learning_rate", "0.001", "--max_steps", "7", "--packing", "concat"])
    assert training.learning_rate == pytest.approx(0.001)
    assert training.max_steps == 7
    assert story.packing == "concat"
    assert story.block_size == 64  # not overridden: from the file
    story, training = parse_args([str(cfg)])
    assert (training.learning_rate, training.max_steps, story.packing) == (0.1, 5, "pad")


def test_cli_accepts_key_equals_value(tmp_path):
    cfg = write_json(tmp_path / "run.json", {"model_type": "gpt2", "train_file": "a.txt"})
    story, training = parse_args([str(cfg), "--block_size=32", "--learning_rate=2e-4"])
    assert story.block_size == 32 and training.learning_rate == pytest.approx(2e-4)


def test_yaml_works_like_json(tmp_path):
    values = {"model_type": "gpt2", "train_file": "a.txt", "num_hidden_layers": 2, "hidden_size": 64,
              "num_attention_heads": 4, "block_size": 128, "learning_rate": 0.0005, "use_cpu": True,
              "report_to": ["none"], "config_overrides": {"n_inner": 128}, "output_dir": str(tmp_path / "out"),
              "warmup_steps": 3, "lr_scheduler_type": "cosine", "max_eval_samples": None}
    json_cfg = write_json(tmp_path / "run.json", values)
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text(
        "// note: a comment key\n"
        "model_type: gpt2\ntrain_file: a.txt\nnum_hidden_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\n"
        "block_size: 128\nlearning_rate: 5e-4\nuse_cpu: true\nreport_to: [none]\n"
        "config_overrides: {n_inner: 128}\n"
        f"output_dir: {tmp_path / 'out'}\nwarmup_steps: 3\nlr_scheduler_type: cosine\nmax_eval_samples: null\n",
        encoding="utf-8",
    )
    s_json, t_json = parse_args([str(json_cfg)])
    s_yaml, t_yaml = parse_args([str(yaml_cfg)])
    assert asdict(s_json) == asdict(s_yaml)
    assert t_json.to_dict() == t_yaml.to_dict()
    assert t_yaml.learning_rate == pytest.approx(5e-4)  # YAML reads 5e-4 as a string: still a float here
    assert t_yaml.use_cpu is True and s_yaml.config_overrides == {"n_inner": 128}


def test_comment_keys_are_ignored(tmp_path):
    cfg = write_json(tmp_path / "c.json", {"//": "what this is", "// learning_rate": "not a key", "// max_steps": 3,
                                           "model_type": "gpt2", "train_file": "a.txt"})
    assert load_file(cfg) == {"model_type": "gpt2", "train_file": "a.txt"}
    story, training = parse_args([str(cfg)])
    assert training.max_steps == -1  # the default, not the commented-out 3


def test_output_dir_defaults_to_runs_config_stem(tmp_path):
    cfg = write_json(tmp_path / "my_run.json", {"model_type": "gpt2", "train_file": "a.txt"})
    assert parse_args([str(cfg)])[1].output_dir == str(Path("runs") / "my_run")
    assert parse_args([str(cfg), "--output_dir", str(tmp_path / "x")])[1].output_dir == str(tmp_path / "x")
    cfg2 = write_json(tmp_path / "other.json", {"model_type": "gpt2", "train_file": "a.txt", "output_dir": "there"})
    assert parse_args([str(cfg2)])[1].output_dir == "there"
    assert parse_args(SCRATCH)[1].output_dir == str(Path("runs") / "tsg")


def test_null_keeps_default_and_bools(tmp_path):
    cfg = write_json(tmp_path / "c.json", {"model_type": "gpt2", "train_file": "a.txt", "max_train_samples": None,
                                           "use_cpu": True, "overwrite_cache": False})
    story, training = parse_args([str(cfg)])
    assert story.max_train_samples is None and training.use_cpu is True and story.overwrite_cache is False
    story, training = parse_args([str(cfg), "--use_cpu", "false", "--overwrite_cache", "true"])
    assert training.use_cpu is False and story.overwrite_cache is True


def test_config_overrides_from_cli_string():
    story, _ = parse_args(SCRATCH + ["--config_overrides", '{"n_inner": 64, "activation_function": "gelu"}'])
    assert story.config_overrides == {"n_inner": 64, "activation_function": "gelu"}
    with pytest.raises(UserError, match="config_overrides"):
        parse_args(SCRATCH + ["--config_overrides", "{n_inner: 64"])
    with pytest.raises(UserError, match="config_overrides"):
        parse_args(SCRATCH + ["--config_overrides", "[1, 2]"])


def test_half_precision_on_cpu_falls_back_to_fp32():
    _, training = parse_args(SCRATCH + ["--use_cpu", "true", "--bf16", "true"])
    assert not training.bf16 and not training.fp16


# --- errors ---


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path):
    cfg = write_json(tmp_path / "typo.json", {"model_type": "gpt2", "train_file": "a.txt", "learning_rat": 0.1})
    with pytest.raises(UserError) as err:
        parse_args([str(cfg)])
    message = str(err.value)
    assert str(cfg) in message and "'learning_rat'" in message
    assert "did you mean 'learning_rate'" in message
    assert "\n" not in message


def test_unknown_key_in_yaml_file(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("model_type: gpt2\ntrain_file: a.txt\nblock_sise: 64\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"typo\.yaml: unknown key 'block_sise'.*did you mean 'block_size'"):
        parse_args([str(cfg)])


def test_unknown_cli_key():
    with pytest.raises(UserError) as err:
        parse_args(SCRATCH + ["--max_step", "3"])
    message = str(err.value)
    assert "command line" in message and "'max_step'" in message and "did you mean 'max_steps'" in message


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(UserError) as err:
        parse_args(SCRATCH + ["--zzzqqq", "1"])
    assert "'zzzqqq'" in str(err.value) and "did you mean" not in str(err.value)


def test_single_dash_option_is_refused():
    with pytest.raises(UserError, match="two dashes"):
        parse_args(SCRATCH + ["-lr", "0.1"])


def test_stray_words_on_the_command_line_are_refused(tmp_path):
    cfg = write_json(tmp_path / "c.json", {"model_type": "gpt2", "train_file": "a.txt"})
    with pytest.raises(UserError, match="max_steps"):
        parse_args([str(cfg), "max_steps", "3"])  # forgot the dashes
    with pytest.raises(UserError, match="other.json"):
        parse_args([str(cfg), str(tmp_path / "other.json")])  # one config file only


def test_wrong_type_in_file_names_file_and_key(tmp_path):
    cfg = write_json(tmp_path / "bad.json", {"model_type": "gpt2", "train_file": "a.txt", "learning_rate": "fast"})
    with pytest.raises(UserError) as err:
        parse_args([str(cfg)])
    assert str(cfg) in str(err.value) and "learning_rate" in str(err.value) and "fast" in str(err.value)


def test_wrong_type_on_cli():
    with pytest.raises(UserError, match="max_steps"):
        parse_args(SCRATCH + ["--max_steps", "ten"])
    with pytest.raises(UserError, match="packing"):
        parse_args(SCRATCH + ["--packing", "stuffed"])
    with pytest.raises(UserError, match="use_cpu"):
        parse_args(SCRATCH + ["--use_cpu", "maybe"])


def test_malformed_json_names_file_and_line(tmp_path):
    cfg = tmp_path / "broken.json"
    cfg.write_text('{\n  "model_type": "gpt2",\n  "train_file": "a.txt"\n  "block_size": 64\n}\n', encoding="utf-8")
    with pytest.raises(UserError) as err:
        parse_args([str(cfg)])
    assert str(err.value).startswith(f"{cfg}:4:")
    assert "malformed JSON" in str(err.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("model_type: gpt2\ntrain_file: a.txt\nblock_size: [64\nlearning_rate: 1\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_file(cfg)
    assert str(err.value).startswith(f"{cfg}:") and "malformed YAML" in str(err.value)


def test_non_string_yaml_key_is_a_config_error(tmp_path):
    cfg = tmp_path / "odd.yaml"
    cfg.write_text("model_type: gpt2\ntrain_file: a.txt\n4: layers\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"odd\.yaml"):
        parse_args([str(cfg)])


def test_config_file_not_found_and_not_an_object(tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse_args([str(tmp_path / "missing.json")])
    cfg = tmp_path / "list.json"
    cfg.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserError, match="list.json"):
        parse_args([str(cfg)])


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model_name_or_path", "gpt2", "--model_type", "gpt2", "--train_file", "a.txt"],
         ["model_name_or_path", "model_type"]),
        (["--train_file", "a.txt"], ["model_name_or_path", "model_type"]),
        (SCRATCH + ["--hidden_size", "30", "--num_attention_heads", "4"], ["hidden_size=30", "num_attention_heads=4"]),
        (["--model_type", "gpt2", "--validation_file", "v.txt"], ["validation_file", "train_file"]),
        (SCRATCH + ["--block_size", "512", "--max_position_embeddings", "256"], ["block_size=512", "256"]),
        (["--model_name_or_path", "gpt2", "--num_hidden_layers", "2", "--train_file", "a.txt"],
         ["num_hidden_layers", "model_name_or_path"]),
        (SCRATCH + ["--block_size", "0"], ["block_size"]),
        (SCRATCH + ["--validation_split_percentage", "100"], ["validation_split_percentage"]),
        (["--model_type", "gpt2", "--dataset_name", ""], ["train_file", "dataset_name"]),
    ],
    ids=["both-models", "no-model", "heads", "validation-without-train", "block-vs-positions",
         "shape-with-pretrained", "zero-block", "split-100", "no-stories"],
)
def test_impossible_combinations(argv, words):
    with pytest.raises(UserError) as err:
        parse_args(argv)
    for word in words:
        assert word in str(err.value)


def test_impossible_combination_in_file_names_file(tmp_path):
    cfg = write_json(tmp_path / "combo.json", {"model_name_or_path": "gpt2", "model_type": "gpt2",
                                               "train_file": "a.txt"})
    with pytest.raises(UserError, match=r"combo\.json"):
        parse_args([str(cfg)])


def test_story_arguments_direct_checks():
    with pytest.raises(UserError):
        StoryArguments(model_type="gpt2", hidden_size=33, num_attention_heads=4, train_file="a.txt")
    ok = StoryArguments(model_type="gpt2", train_file="a.txt", config_overrides='{"n_inner": 8}')
    assert ok.from_scratch and ok.config_overrides == {"n_inner": 8}
    assert not StoryArguments(model_name_or_path="gpt2", train_file="a.txt").from_scratch


def test_write_run_config(tmp_path):
    story, training = parse_args(SCRATCH + ["--output_dir", str(tmp_path / "out"), "--learning_rate", "0.002"])
    path = write_run_config(story, training)
    record = json.loads(path.read_text())
    import tsg

    assert path == tmp_path / "out" / "run_config.json"
    assert record["tsg_version"] == tsg.__version__
    assert set(record["versions"]) >= {"torch", "transformers", "peft", "accelerate", "datasets"}
    assert all(isinstance(v, str) and v for v in record["versions"].values())
    assert record["config"]["model_type"] == "gpt2" and record["config"]["learning_rate"] == 0.002
    assert record["config"]["output_dir"] == str(tmp_path / "out")
    assert "git_commit" in record


# --- every number of the run config, checked by one rule ---


def numeric_fields(cls) -> set[str]:
    """The int and float fields of a dataclass (bools are ints to Python, not numbers to a user)."""
    import dataclasses

    names = set()
    for f in dataclasses.fields(cls):
        kind = str(f.type)
        if ("int" in kind or "float" in kind) and not any(word in kind for word in ("dict", "list", "Literal")):
            names.add(f.name)
    return names


def test_every_number_of_the_run_config_has_a_range():
    from transformers import TrainingArguments

    from tsg.config import RANGES

    assert numeric_fields(StoryArguments) | numeric_fields(TrainingArguments) <= set(RANGES)


def out_of_range(key: str) -> int | float:
    """A value RANGES refuses for `key`: the first of a few candidates its rule says no to."""
    from tsg.config import RANGES

    return next(value for value in (0, -2, 2**32, 1.5) if not RANGES[key][1](value))


@pytest.mark.parametrize("key", sorted(__import__("tsg.config", fromlist=["RANGES"]).RANGES))
def test_a_number_out_of_range_stops_before_any_work(key, tmp_path, small_txt, capsys):
    from conftest import error_line, run_tsg, tiny_cli

    value = out_of_range(key)
    output = tmp_path / "run"
    code, _, err = run_tsg(["train", *tiny_cli(small_txt, output), f"--{key}", str(value)], capsys)
    assert code == 2, err[-2000:]
    line = error_line(err, "train")  # one line, no traceback
    assert key in line, line  # tsg's rule ("expected ..., got ...") or TrainingArguments' own check, naming it
    assert not output.exists()
