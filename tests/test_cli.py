"""The `tsg` command: its subcommands and their help, one config machinery for every command (JSON, YAML and TOML
files, -c/--config, the command line overriding the file), and a package whose modules import one way and never
shadow a library when a file of it runs as a script."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, error_line, python_env, run_tsg

from tsg import cli, config
from tsg.generate import GENERATE
from tsg.merge import MERGE
from tsg.prepare import PREPARE


# --- one command ---


def test_tsg_help_lists_every_command_with_one_line(capsys):
    code, out, _ = run_tsg(["--help"], capsys)
    assert code == 0
    listed = [line.split()[0] for line in out.split("commands:")[1].strip().splitlines()[:len(cli.COMMANDS)]]
    assert listed == list(cli.COMMANDS) == ["prepare", "train", "merge", "generate", "evaluate", "export", "play",
                                            "bench"]
    assert run_tsg([], capsys)[1] == out  # no command: the same list


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_help_shows_its_options_with_defaults(name, capsys):
    code, out, _ = run_tsg([name, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: tsg {name}")
    assert "-c CONFIG, --config CONFIG" in out and "(default: " in out
    expected = {"train": "--learning_rate", "generate": "--temperature", "evaluate": "--num_samples_per_prompt",
                "merge": "--atol", "prepare": "--train_fraction", "export": "--outtype", "bench": "--tiny",
                "play": "--port"}[name]
    assert expected in out


def test_unknown_command_is_one_line_with_a_close_match(capsys):
    code, _, err = run_tsg(["generat"], capsys)
    assert code == 2 and err == "tsg: error: unknown command 'generat' (did you mean 'generate'?)\n"


def test_console_script_and_python_m_forms(tmp_path):
    script = Path(sys.executable).with_name("tsg")
    assert script.is_file(), "the tsg console script is not installed (pip install -e .)"
    for cmd in ([str(script), "generate", "--help"], [sys.executable, "-m", "tsg.generate", "--help"],
                [sys.executable, "-m", "tsg.evaluate", "--help"], [sys.executable, "-m", "tsg", "--help"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=python_env(), cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "usage: tsg" in done.stdout or "commands:" in done.stdout


def test_a_returned_report_is_not_an_exit_status(tmp_path, sample_stories):
    """The console script passes main's return value to sys.exit: commands return nothing."""
    from conftest import write_txt

    stories = write_txt(tmp_path / "in.txt", sample_stories[:10])
    done = subprocess.run([str(Path(sys.executable).with_name("tsg")), "prepare", str(stories), str(tmp_path / "out")],
                          capture_output=True, text=True, env=python_env(), timeout=120)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr
    assert "tsg prepare: 9 training and 1 held-out stories" in done.stderr


# --- one config machinery ---


CONFIG_TEXTS = {
    "json": '{"// what": "a comment", "model": "roneneldan/TinyStories-1M", "temperature": 0.7, "banned_words": ["dog", "cat"],'
            ' "greedy": false, "num_return_sequences": 2}',
    "yaml": "// what: a comment\nmodel: roneneldan/TinyStories-1M\ntemperature: 0.7\nbanned_words: [dog, cat]\ngreedy: false\n"
            "num_return_sequences: 2\n",
    "toml": '"// what" = "a comment"\nmodel = "roneneldan/TinyStories-1M"\ntemperature = 0.7\nbanned_words = ["dog", "cat"]\n'
            "greedy = false\nnum_return_sequences = 2\n",
}


@pytest.mark.parametrize("suffix", list(CONFIG_TEXTS))
def test_json_yaml_and_toml_read_alike_positionally_or_with_c(suffix, tmp_path):
    path = tmp_path / f"gen.{suffix}"
    path.write_text(CONFIG_TEXTS[suffix], encoding="utf-8")
    for argv in ([str(path)], ["-c", str(path)], ["--config", str(path)], [f"--config={path}"]):
        model, _, settings = config.parse(GENERATE, argv + ["-n", "3", "--seed", "9"])
        assert model.model == "roneneldan/TinyStories-1M" and settings.temperature == 0.7 and settings.banned_words == ["dog", "cat"]
        assert settings.do_sample and (settings.num_return_sequences, settings.seed) == (3, 9)  # the CLI wins


def test_train_reads_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model_type = "gpt2"\ntrain_file = "a.txt"\nlearning_rate = 5e-4\nreport_to = ["none"]\n'
                    'config_overrides = {n_inner = 64}\n', encoding="utf-8")
    story, training = config.parse_args(["-c", str(path), "--max_steps", "3"])
    assert (story.model_type, training.learning_rate, training.max_steps) == ("gpt2", 5e-4, 3)
    assert story.config_overrides == {"n_inner": 64} and training.output_dir == str(Path("runs") / "run")


@pytest.mark.parametrize("text, message", [
    ('model = "x"\ntemprature = 1\n', "unknown key 'temprature' (did you mean 'temperature'?)"),
    ('model = "x"\ntop_k = "many"\n', "top_k: invalid int value: 'many'"),
    ('model = "x"\ngreedy = "yes"\n', "greedy: expected true or false"),
    ('model = "x"\n[sampling]\ntop_k = 3\n', "unknown key 'sampling'"),
    ('model = "x\n', "malformed TOML"),
])
def test_bad_toml_is_one_line_naming_the_file(text, message, tmp_path, capsys):
    path = tmp_path / "gen.toml"
    path.write_text(text, encoding="utf-8")
    code, _, err = run_tsg(["generate", "-c", path], capsys)
    line = error_line(err, "generate")
    assert code == 2 and str(path) in line and message in line


def test_values_may_start_with_a_dash(tmp_path):
    """Dialogue in stories opens with a dash: such prompts and markers are values, on the command line and in files."""
    hub = ["--model", "roneneldan/TinyStories-1M"]
    _, options, settings = config.parse(GENERATE, hub + ["-q", "- Mom, can I go out?", "--end_marker", "--- END",
                                                         "--temperature", "-1", "--do_sample", "false"])
    assert (options.prompt, settings.end_marker, settings.temperature) == ("- Mom, can I go out?", "--- END", -1.0)
    path = tmp_path / "gen.toml"
    path.write_text('model = "roneneldan/TinyStories-1M"\nprompt = "-Hi"\nstart_marker = "-> "\n', encoding="utf-8")
    _, options, settings = config.parse(GENERATE, [str(path)])
    assert (options.prompt, settings.start_marker) == ("-Hi", "-> ")


def test_an_error_names_where_the_value_came_from(tmp_path):
    path = tmp_path / "gen.toml"
    path.write_text('model = "roneneldan/TinyStories-1M"\ntop_p = 2.0\n', encoding="utf-8")
    with pytest.raises(config.UserError, match=rf"^{re.escape(str(path))}: top_p: expected a number in \(0, 1\]"):
        config.parse(GENERATE, [str(path)])
    with pytest.raises(config.UserError, match=r"^command line: top_k: expected 0 \(off\)"):
        config.parse(GENERATE, [str(path), "--top_p", "0.5", "--top_k", "-2"])
    with pytest.raises(config.UserError, match=r"^command line: num_return_sequences: expected a positive integer"):
        config.parse(GENERATE, [str(path), "--top_p", "0.5", "-n", "0"])
    with pytest.raises(config.UserError, match=r"^command line: -c needs the name of a config file"):
        config.parse(GENERATE, ["-c"])


def test_positional_fields_and_stray_words():
    merge, = config.parse(MERGE, ["runs/a", "runs/b", "--atol", "0.01"])
    assert (merge.run_dir, merge.out_dir, merge.atol) == ("runs/a", "runs/b", 0.01)
    with pytest.raises(config.UserError, match="an unexpected word 'runs/c'"):
        config.parse(MERGE, ["runs/a", "runs/b", "runs/c"])
    with pytest.raises(config.UserError, match="options take two dashes and a key, got '-x'"):
        config.parse(MERGE, ["runs/a", "runs/b", "-x", "1"])


def test_every_command_keeps_its_options_in_one_dataclass_each():
    """Each option is written once: as a dataclass field, whatever reads it (file, command line, help)."""
    from tsg.bench import BENCH
    from tsg.evaluate.__main__ import EVALUATE

    for command in (config.TRAIN, GENERATE, MERGE, PREPARE, EVALUATE, BENCH):
        names = [f for cls in command.types for f in config.fields(cls)]
        assert len({f.name for f in names}) == len(names)  # no field twice
        tsg_fields = [f for cls in command.types if cls.__module__.startswith("tsg") for f in config.fields(cls)]
        assert all(f.metadata.get("help") for f in tsg_fields)


# --- the package ---


LAYERS = ["files", "config", "data", "model", "adapter", "generation", "scoring", "conversion", "llamacpp", "plots",
          "playground", "budget", "optimizers", "callbacks", "trainer"]
COMMAND_MODULES = ["train", "generate", "merge", "evaluate.__main__", "prepare", "export", "play", "bench", "cli",
                   "__main__"]


def tsg_imports(path: Path) -> set[str]:
    """The tsg modules a file imports (module names relative to the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tsg"):
            module = node.module.removeprefix("tsg").lstrip(".")
            found |= {module} if module else {alias.name for alias in node.names if alias.name != "__version__"}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("tsg.") for a in node.names if a.name.startswith("tsg.")}
    return found


def test_imports_run_one_way_and_no_module_imports_a_command():
    modules = {str(p.relative_to(REPO / "tsg").with_suffix("")).replace("/", "."): p
               for p in (REPO / "tsg").rglob("*.py") if "metrics" not in p.parts}
    modules.pop("__init__")
    assert set(modules) == set(LAYERS) | set(COMMAND_MODULES), sorted(modules)
    for name in LAYERS:
        imported = tsg_imports(modules[name])
        below = set(LAYERS[:LAYERS.index(name)])
        assert imported <= below, f"tsg.{name} imports {sorted(imported - below)}: not a module below it"
    for name in COMMAND_MODULES:
        imported = tsg_imports(modules[name]) - {"cli"} if name == "__main__" else tsg_imports(modules[name])
        assert imported <= set(LAYERS), f"tsg.{name} imports the command module(s) {sorted(imported - set(LAYERS))}"


def test_no_module_shadows_a_library_when_a_file_runs_as_a_script():
    """`accelerate launch tsg/train.py` puts tsg/ first on sys.path: no name there may be a library's."""
    tsg_dir = REPO / "tsg"
    names = {p.stem for p in tsg_dir.glob("*.py")} | {p.name for p in tsg_dir.iterdir()
                                                      if p.is_dir() and (p / "__init__.py").is_file()}
    names -= {"__init__", "__main__"}
    path = [p for p in sys.path if Path(p or ".").resolve() not in (tsg_dir, REPO)]
    shadowed = {name for name in names if name in sys.stdlib_module_names
                or importlib.machinery.PathFinder.find_spec(name, path) is not None}
    assert not shadowed


def test_script_form_finds_the_libraries(tmp_path):
    """`python tsg/train.py` (as `accelerate launch tsg/train.py` runs it) has tsg/ first on sys.path: it runs, and
    `import evaluate` there still finds the library, not a tsg module."""
    script = subprocess.run([sys.executable, str(REPO / "tsg" / "train.py"), "--help"], capture_output=True,
                            text=True, env=python_env(), cwd=tmp_path, timeout=120)
    assert script.returncode == 0 and "--learning_rate" in script.stdout, script.stderr[-2000:]
    code = f"import sys; sys.path.insert(0, {str(REPO / 'tsg')!r}); import evaluate; print(evaluate.__file__)"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(),
                           cwd=tmp_path, timeout=120)
    assert shown.returncode == 0 and "site-packages" in shown.stdout, shown.stdout + shown.stderr[-2000:]
