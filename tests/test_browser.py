"""`tsg play` in a real browser: the page is served by the command as a user starts it, and driven in headless
Chromium (Debian's package; Playwright drives it, and downloads no browser). Skips, saying why, where there is no
Chromium, Playwright or Gradio. TSG_CHROMIUM names another Chromium binary."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import python_env, run_tsg, save_random_model, train_evaluated_run
from tsg.generation import read_rows

pytest.importorskip("gradio", reason="gradio is not installed (pip install 'tsg[play]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

CHROMIUM = os.environ.get("TSG_CHROMIUM") or next(
    (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium, or set "
                                "TSG_CHROMIUM)")

CONTEXT = 1024
LONG = 1000  # new tokens: a story that takes long enough to be seen growing
DONE = ("tokens/s", "⚠️", "both told", "saved")  # what the status line says once an action ended


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("browser")
    return (save_random_model(root / "model_a", tokenizer, seed=0, context=CONTEXT, width=128),
            save_random_model(root / "model_b", tokenizer, seed=1, context=CONTEXT, width=128))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_txt) -> Path:
    folder = tmp_path_factory.mktemp("browser_runs")
    train_evaluated_run(small_txt, folder / "tiny")
    return folder


@pytest.fixture(scope="module")
def server(models, runs, tmp_path_factory):
    """`tsg play MODEL_A MODEL_B --port P --runs_dir RUNS` in its own process group; its address."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "play.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "tsg", "play", *map(str, models), "--port", str(port),
                                    "--runs_dir", str(runs), "--device", "cpu"], env=python_env(), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"tsg play exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"tsg play did not serve {url} within 180 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):  # the whole group: no server left behind by a failed test
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A fresh page: its status lines are empty, so the next one shown is the answer to this test's action."""
    context = browser.new_context(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    page = context.new_page()
    page.goto(server)
    page.locator("#prompt textarea").wait_for()
    yield page
    context.close()


def status(page, where: str = "#status", timeout: float = 120) -> str:
    """The status line once the action under way has ended."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = page.locator(where).inner_text()
        if any(word in text for word in DONE):
            return text
        time.sleep(0.05)
    raise AssertionError(f"{where} said {page.locator(where).inner_text()!r} after {timeout} s")


def set_value(page, selector: str, value) -> None:
    """Type into a control and leave it (a dropdown takes a typed value when it loses focus)."""
    field = page.locator(selector)
    field.click()
    field.press("Control+a")
    field.type(str(value))
    page.locator("h1").click()


def cli_story(model: Path, tmp_path: Path, capsys, **settings) -> list[dict]:
    """The rows `tsg generate --output` writes for "Once upon a time" with these settings (one torch thread, as the
    server runs)."""
    output = tmp_path / "cli.jsonl"
    words = [w for key, value in settings.items() for w in (f"--{key}", str(value))]
    code, _, err = run_tsg(["generate", "--model", model, "-q", "Once upon a time", "--output", output, *words],
                           capsys)
    assert code == 0, err
    return read_rows(output)


def browser_text(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")  # what a textarea makes of a carriage return


def test_the_page_loads_with_tsg_generates_defaults(page, models):
    assert page.title() == "tsg play"
    assert page.locator("#model input").input_value() == str(models[0])
    assert page.locator("#prompt textarea").input_value() == "Once upon a time"
    assert page.locator("#setting-max_new_tokens input").input_value() == "200"
    assert page.locator("#setting-seed input").input_value() == "0"


def test_a_story_streams_in_and_is_the_command_lines_story_for_the_seed(page, models, tmp_path, capsys):
    set_value(page, "#setting-max_new_tokens input", LONG)
    set_value(page, "#setting-seed input", 5)
    page.locator("#tell").click()
    seen, deadline = [], time.time() + 120
    while not any(word in page.locator("#status").inner_text() for word in DONE):
        assert time.time() < deadline, f"no story was told in 120 s: {page.locator('#status').inner_text()!r}"
        text = page.locator("#stories textarea").input_value()
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        time.sleep(0.02)
    final = page.locator("#stories textarea").input_value()
    assert "tokens/s" in page.locator("#status").inner_text()
    growing = [text for text in seen if text != final]
    assert growing, "the story appeared whole: it did not grow on the page"
    assert all(final.startswith(text) for text in growing) and len(growing[0]) < len(final)
    (row,) = cli_story(models[0], tmp_path, capsys, max_new_tokens=LONG, seed=5)
    assert final == browser_text(row["story"])


def test_compare_tells_two_models_on_the_same_seed(page, models, tmp_path, capsys):
    page.get_by_role("tab", name="Compare").click()
    assert page.locator("#model-b input").input_value() == str(models[1])
    set_value(page, "#setting-seed input", 9)
    page.locator("#compare").click()
    assert "both told" in status(page, "#compare-status")
    told_a = page.locator("#story-a textarea").input_value()
    told_b = page.locator("#story-b textarea").input_value()
    (row_a,) = cli_story(models[0], tmp_path, capsys, seed=9)
    (row_b,) = cli_story(models[1], tmp_path, capsys, seed=9)
    assert told_a == browser_text(row_a["story"]) and told_b == browser_text(row_b["story"]) and told_a != told_b


@pytest.mark.parametrize("output_format", ["csv", "jsonl"])
def test_the_save_button_writes_the_shown_stories_as_tsg_generate_does(page, models, tmp_path, capsys,
                                                                          output_format):
    set_value(page, "#setting-num_return_sequences input", 2)
    set_value(page, "#setting-seed input", 4)
    page.locator(f"#save-format input[value={output_format}]").check()
    page.locator("#tell").click()
    assert "2 stories" in status(page)
    shown = page.locator("#stories textarea").input_value()
    page.locator("#save").click()
    link = page.locator("#saved a").first
    link.wait_for(timeout=30_000)
    assert "saved 2 stories" in status(page)
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / f"saved.{output_format}"
    download.value.save_as(saved)
    rows = read_rows(saved)
    assert shown == browser_text("\n\n".join(f"--- story {row['number']} ---\n{row['story']}" for row in rows))
    cli = tmp_path / f"cli.{output_format}"
    code, _, err = run_tsg(["generate", "--model", models[0], "-q", "Once upon a time", "-n", 2, "--seed", 4,
                            "--output", cli], capsys)
    assert code == 0, err
    assert rows == read_rows(cli)  # every column: the stories and the settings beside them


@pytest.mark.parametrize("control, value, expected", [
    ("#prompt textarea", "", "prompt: the prompt is empty"),
    ("#prompt textarea", "dog " * (CONTEXT + 50), f"but the model's context is {CONTEXT} tokens"),
    ("#setting-temperature input", 0, "temperature: expected a positive number when sampling"),
    ("#model input", "/", "/: not a model folder"),
])
def test_bad_input_shows_one_line_on_the_page(page, control, value, expected):
    if control == "#prompt textarea":
        page.locator(control).fill(value)
    else:
        set_value(page, control, value)
    page.locator("#tell").click()
    shown = status(page)
    assert expected in shown and shown.startswith("⚠️") and "Traceback" not in page.content()


def test_the_runs_tab_draws_a_runs_loss_curves(page, runs):
    page.get_by_role("tab", name="Runs").click()
    set_value(page, "#run input", runs / "tiny")
    picture = page.locator("#run-plot img").first
    picture.wait_for(timeout=60_000)
    assert picture.get_attribute("src").startswith("data:image/")
    picture.evaluate("img => img.decode()")  # the picture is drawn, not just linked
    assert picture.evaluate("img => img.naturalWidth") >= 500
    config = json.loads((runs / "tiny" / "run_config.json").read_text())
    assert str(config["config"]["max_steps"]) in page.locator("#run-config").inner_text()
    assert "no eval_report.json scores" in page.locator("#run-status").inner_text()
