"""The playground's library side (tsg.playground, tsg.plots) without a browser: the page tells the command line's
stories, grows them, stops, saves them as `tsg generate --output` does, refuses bad input in one line, and draws a
run; every run leaves loss.png. tests/test_browser.py drives the page itself in Chromium."""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from conftest import error_line, run_tsg, save_random_model, train_evaluated_run
from tsg import playground, plots
from tsg.generation import LIMITS, Settings, load_model, read_rows, tell_stories
from tsg.files import UserError
from tsg.playground import Playground, settings_from, show_stories

CONTEXT = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    return save_random_model(tmp_path_factory.mktemp("play") / "random_a", tokenizer, seed=0, context=CONTEXT)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, small_txt) -> Path:
    return train_evaluated_run(small_txt, tmp_path_factory.mktemp("runs") / "tiny")


def told(playground_: Playground, model: Path, prompt: str, settings: Settings, stop=None):
    """Every (texts, Told-or-None) Playground.tell yielded."""
    return list(playground_.tell(str(model), "none", prompt, settings, stop))


def test_every_setting_of_tsg_generate_is_a_control_with_its_default_and_limits():
    gr = pytest.importorskip("gradio")
    controls = playground.setting_controls(gr)
    shown = {f.name for f in playground.SETTINGS_SHOWN}
    assert shown == {f.name for f in fields(Settings)} - {"batch_size"}
    for f, control in zip(playground.SETTINGS_SHOWN, controls):
        default = f.default if f.default_factory is MISSING else f.default_factory()
        assert control.label == f.name
        assert control.value == (", ".join(default) if isinstance(default, list) else default), f.name
        if f.name in LIMITS:
            assert (control.minimum, control.maximum) == LIMITS[f.name], f.name
    # the controls' values, untouched, are tsg generate's defaults
    assert settings_from([control.value for control in controls]) == Settings()


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_limits_shown_are_the_limits_settings_check(name):
    low, high = LIMITS[name]
    kind = type(getattr(Settings(), name))
    open_low = name in ("temperature", "top_p", "repetition_penalty")
    step = 1 if kind is int else 0.001
    Settings(**{name: kind(low + step if open_low else low)})
    with pytest.raises(UserError, match=name):
        Settings(**{name: kind(low if open_low else low - step)})
    if high is not None:
        Settings(**{name: kind(high)})
        with pytest.raises(UserError, match=name):
            Settings(**{name: kind(high + step)})


def test_the_page_tells_the_stories_tell_stories_tells_and_grows_them(model_dir):
    settings = Settings(num_return_sequences=3, seed=7, max_new_tokens=40, temperature=0.9)
    steps = told(Playground(device="cpu"), model_dir, "Once upon a time", settings)
    texts, result = steps[-1]
    model, tokenizer = load_model(str(model_dir), device="cpu")
    expected = tell_stories(model, tokenizer, ["Once upon a time"], settings)
    assert texts == [story.text for story in expected] and result.stories == expected
    growing = [texts for texts, result in steps[:-1]]
    assert growing, "no stories were handed over while they grew"
    for earlier, later in zip(growing, growing[1:] + [texts]):
        assert all(later_text.startswith(earlier_text) for earlier_text, later_text in zip(earlier, later))
    assert result.record["seed"] == 7 and result.record["model"] == str(model_dir)


def test_stop_ends_the_stories_at_their_next_token(model_dir):
    stop = threading.Event()
    settings = Settings(seed=1, max_new_tokens=CONTEXT - 10)
    play = Playground(device="cpu")
    for texts, result in play.tell(str(model_dir), "none", "Once upon a time", settings, stop):
        if result is None:
            stop.set()
    full = told(play, model_dir, "Once upon a time", settings)[-1][1]
    assert result.stopped and not full.stopped
    assert result.stories[0].tokens < full.stories[0].tokens
    assert full.stories[0].text.startswith(result.stories[0].text)


def test_a_telling_closed_early_ends_before_the_next_one_begins(model_dir):
    settings = Settings(seed=2, max_new_tokens=CONTEXT - 10)
    play = Playground(device="cpu")
    telling = play.tell(str(model_dir), "none", "Once upon a time", settings)
    next(telling)  # the first stories so far: the page went away here
    telling.close()
    assert not any(thread.name == "tsg-play-telling" for thread in threading.enumerate())
    again = told(play, model_dir, "Once upon a time", settings)[-1][1]
    model, tokenizer = load_model(str(model_dir), device="cpu")
    assert again.stories == tell_stories(model, tokenizer, ["Once upon a time"], settings) and not again.stopped


@pytest.mark.parametrize("output_format", ["csv", "jsonl"])
def test_saved_stories_are_the_rows_tsg_generate_writes(model_dir, tmp_path, capsys, output_format):
    settings = Settings(num_return_sequences=2, seed=3, max_new_tokens=30)
    play = Playground(device="cpu")  # its saved files last as long as it does
    result = told(play, model_dir, "Tom had a dog", settings)[-1][1]
    saved = read_rows(play.save(result, output_format))
    output = tmp_path / f"cli.{output_format}"
    code, _, err = run_tsg(["generate", "--model", model_dir, "-q", "Tom had a dog", "-n", 2, "--seed", 3,
                            "--max_new_tokens", 30, "--device", "cpu", "--output", output], capsys)
    assert code == 0, err
    cli = read_rows(output)
    assert saved == cli


def test_bad_input_is_one_line(model_dir, tmp_path):
    play = Playground(device="cpu")
    cases = [
        (model_dir, "  ", Settings(), "prompt: the prompt is empty"),
        (model_dir, "dog " * CONTEXT, Settings(), f"but the model's context is {CONTEXT} tokens"),
        (tmp_path, "Once", Settings(), "not a model folder"),
        ("", "Once", Settings(), "model: choose a model"),
    ]
    for model, prompt, settings, expected in cases:
        with pytest.raises(UserError, match=expected):
            told(play, model, prompt, settings)
    with pytest.raises(UserError, match="temperature: expected a positive number when sampling"):
        settings_from([0 if f.name == "temperature" else getattr(Settings(), f.name) if f.name != "banned_words"
                       else "" for f in playground.SETTINGS_SHOWN])
    with pytest.raises(UserError, match="save: no stories yet"):
        play.save(None, "csv")
    assert playground.message(UserError("prompt: the prompt is empty")) == "⚠️ prompt: the prompt is empty"


def test_several_stories_are_shown_numbered_as_tsg_generate_prints_them():
    assert show_stories(["One."]) == "One."
    assert show_stories(["One.", "Two."]) == "--- story 1 ---\nOne.\n\n--- story 2 ---\nTwo."


def test_every_run_leaves_loss_png_and_the_runs_tab_reads_its_curves(trained_run, tmp_path):
    png = trained_run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = plots.curves(plots.read_log_history(trained_run))
    assert len(curves["training loss"][0]) == 6 and curves["evaluation loss"][0] == [3, 6]  # step 6 once: the final evaluation is not made twice
    assert "evaluation bits per byte" in curves
    play = Playground(device="cpu", runs_dir=trained_run.parent)
    assert play.run_choices() == [str(trained_run)]
    figure, config, scores = play.run_report(str(trained_run))
    assert len(figure.axes) == 2 and config["config"]["max_steps"] == 6 and scores == []
    (trained_run / "eval_report.json").write_text(json.dumps({"bits_per_byte": 2.5, "eos_rate": 0.5}))
    assert play.run_report(str(trained_run))[2] == [["bits_per_byte", 2.5], ["eos_rate", 0.5]]
    with pytest.raises(UserError, match="no trainer_state.json"):
        play.run_report(str(tmp_path))


def test_a_run_under_way_is_drawn_from_its_newest_checkpoint(tmp_path):
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        history = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, step + 1)]
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert plots.run_state_file(tmp_path) == tmp_path / "checkpoint-10" / "trainer_state.json"
    assert plots.write_loss_plot(tmp_path).read_bytes()[:4] == b"\x89PNG"


def test_play_names_its_models_first_and_refuses_a_folder_that_is_not_a_model(model_dir, tmp_path, capsys):
    from tsg.config import parse
    from tsg.play import PLAY

    (options,) = parse(PLAY, [str(model_dir), str(model_dir), "--port", "8000"])
    assert options.models == [str(model_dir), str(model_dir)] and options.port == 8000
    assert Playground(options.models, runs_dir=tmp_path, device="cpu").model_choices() == [str(model_dir)]
    code, _, err = run_tsg(["play", tmp_path], capsys)
    assert code == 2 and "not a model folder" in error_line(err, "play")
    code, _, err = run_tsg(["play", "--port", "70000"], capsys)
    assert code == 2 and "port: expected an integer from 1 to 65535" in error_line(err, "play")
    code, _, err = run_tsg(["play", model_dir, "play.yaml"], capsys)
    assert code == 2 and "the config file 'play.yaml' comes first" in error_line(err, "play")


def test_play_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    code, _, err = run_tsg(["play"], capsys)
    assert code == 2 and "pip install 'tsg[play]'" in error_line(err, "play")
