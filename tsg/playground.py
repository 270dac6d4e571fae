"""The story playground: a Gradio page over the story-telling library (tsg.generation) and a run's pictures
(tsg.plots), served by `tsg play`.

    page = build_page(Playground(["runs/tiny_cpu"]))
    page.launch(server_name="127.0.0.1")

- **Tell**: a prompt, every setting of `tsg generate` (same names, defaults and limits), the stories growing token by
  token, Stop, and Save: the shown stories with their settings as CSV or JSON lines, the rows `tsg generate
  --output` writes.
- **Compare**: two models (anything `tsg generate --model` loads) on the same prompt, settings and seed.
- **Runs**: a run folder's loss curves and bits per byte (trainer_state.json), its run_config.json, and its
  eval_report.json scores.

Stories are told by `iter_stories`, as `tsg generate` tells them: the same model, prompt, settings and seed give the
command line's stories. Bad input is one line on the page (the command line's message), never a stack trace.
"""

import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, get_type_hints

from tsg.files import UserError, one_line
from tsg.generation import (LIMITS, QUANTIZATIONS, Settings, Story, check_model_name, fit_to_context, iter_stories,
                            load_model, output_record, prompt_texts, write_stories)
from tsg.model import context_length
from tsg.plots import loss_figure, read_log_history, run_state_file
from tsg.scoring import SCORE_KEYS

logger = logging.getLogger(__name__)

# batch_size is left out: the page tells one prompt at a time, whose stories are one batch whatever it is
SETTINGS_SHOWN = [f for f in fields(Settings) if f.name != "batch_size"]
LOADED_MODELS = 2  # models kept in memory: the two of a comparison
REFRESH_SECONDS = 0.1  # how often the page is sent the stories so far


@dataclass
class Told:
    """What one press of Tell told: the stories and what a stories file records beside them."""

    stories: list[Story]
    record: dict
    seconds: float = 0.0  # telling them, the model's loading left out
    stopped: bool = False  # Stop ended them early


def show_stories(texts: list[str]) -> str:
    """Stories as the page shows them: one as it is, several numbered as `tsg generate` prints them."""
    if len(texts) == 1:
        return texts[0]
    return "\n\n".join(f"--- story {i} ---\n{text}" for i, text in enumerate(texts, 1))


def settings_from(values) -> Settings:
    """Settings from the page's controls (values in SETTINGS_SHOWN's order; banned words comma-separated)."""
    kinds = get_type_hints(Settings)
    given = {}
    for f, value in zip(SETTINGS_SHOWN, values):
        kind = kinds[f.name]
        if kind in (int, float):
            if value is None or value == "":
                raise UserError(f"{f.name}: expected a number")
            if kind is int and float(value) != int(float(value)):
                raise UserError(f"{f.name}: expected an integer, got {value}")
            value = kind(float(value)) if kind is int else float(value)
        elif kind is bool:
            value = bool(value)
        elif kind == list[str]:
            value = [word.strip() for word in str(value or "").replace("\n", ",").split(",") if word.strip()]
        else:
            value = str(value or "")
        given[f.name] = value
    return Settings(**given)


def message(error: BaseException | str) -> str:
    return f"⚠️ {one_line(error, 2000)}"


class Telling(threading.Thread):
    """One call of iter_stories in a thread of its own, so that the page's thread can send the stories as they grow:
    `so_far` is the newest texts (replaced, never changed), then `stories` or `error` once it ends."""

    def __init__(self, model, tokenizer, prompt: str, settings: Settings, stop: threading.Event):
        super().__init__(name="tsg-play-telling", daemon=True)
        self.model, self.tokenizer, self.prompt, self.settings, self.stop = model, tokenizer, prompt, settings, stop
        self.so_far: list[str] = []
        self.stories: list[Story] = []
        self.error: BaseException | None = None
        self.stopped = False  # Stop ended the stories early

    def grown(self, texts: list[str]) -> None:
        self.so_far = texts

    def run(self) -> None:
        try:  # beam search keeps several candidates until the end: its stories appear when told
            batches = iter_stories(self.model, self.tokenizer, [self.prompt], self.settings, stop=self.stop,
                                   on_text=self.grown if self.settings.num_beams == 1 else None)
            self.stories = [story for batch in batches for story in batch]
            self.stopped = self.stop.is_set()
        except BaseException as e:  # noqa: BLE001 (handed to the page's thread)
            self.error = e


class Playground:
    """The page's state and actions, without the page: models loaded once, stories told one telling at a time."""

    def __init__(self, models=(), runs_dir: str | Path = "runs", device: str = "auto",
                 trust_remote_code: bool = False, allow_changed_base: bool = False):
        self.models = list(dict.fromkeys(models))
        self.runs_dir = Path(runs_dir)
        self.device, self.trust_remote_code, self.allow_changed_base = device, trust_remote_code, allow_changed_base
        self._loaded: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self._telling = threading.Lock()  # one model call at a time: torch's random generator is the process's
        self._stops: dict[str, threading.Event] = {}  # each session's telling under way, by its Stop
        self._saved = tempfile.TemporaryDirectory(prefix="tsg-play-")  # saved stories files, removed at exit

    # --- models ---

    def model_choices(self) -> list[str]:
        """The models given, then every model folder and adapter run under runs_dir, newest first."""
        found = [p for p in self._run_folders() if (p / "config.json").is_file() or (p / "adapter_config.json").is_file()]
        return list(dict.fromkeys([*self.models, *(str(p) for p in newest_first(found, lambda p: p))]))

    def _run_folders(self) -> list[Path]:
        return [p for p in self.runs_dir.iterdir() if p.is_dir()] if self.runs_dir.is_dir() else []

    def load(self, name: str, quantization: str = "none"):
        """(model, tokenizer) of `name`, loaded once (the last LOADED_MODELS are kept)."""
        name = (name or "").strip()
        if not name:
            raise UserError("model: choose a model, or type a folder or a hub name")
        if quantization not in QUANTIZATIONS:
            raise UserError(f"quantization: expected one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
        key = (name, quantization)
        if key not in self._loaded:
            check_model_name(name)  # a folder that is not a model: one line before anything loads
            while len(self._loaded) >= LOADED_MODELS:
                self._loaded.popitem(last=False)
            self._loaded[key] = load_model(name, quantization, self.device,
                                           allow_changed_base=self.allow_changed_base,
                                           trust_remote_code=self.trust_remote_code)
        self._loaded.move_to_end(key)
        return self._loaded[key]

    # --- telling ---

    def begin(self, session: str) -> threading.Event:
        """A new telling of `session`: the event its Stop sets (a Stop before it began is not carried over)."""
        self._stops[session] = threading.Event()
        return self._stops[session]

    def end(self, session: str, stop: threading.Event) -> None:
        """The telling that `begin` gave `stop` is over: Stop has nothing more to end."""
        if self._stops.get(session) is stop:
            del self._stops[session]

    def stop(self, session: str) -> None:
        """Stop the stories `session` is being told: they end at their next token."""
        if session in self._stops:
            self._stops[session].set()

    def tell(self, name: str, quantization: str, prompt: str, settings: Settings,
             stop: threading.Event | None = None) -> Iterator[tuple[list[str], Told | None]]:
        """Tell `prompt`'s stories with model `name`: (the stories so far, None) every REFRESH_SECONDS while they
        grow, then (their texts, Told). Bad input raises a UserError before the model runs. Closing the generator
        (the page went away) stops the telling and waits for it."""
        stop = stop or threading.Event()
        prompt_texts([prompt], settings.start_marker)  # an empty prompt: one line before a model loads
        with self._telling:  # loading too: two pages loading at once would load (or merge) a model twice
            model, tokenizer = self.load(name, quantization)
            settings = fit_to_context(context_length(model.config), tokenizer, [prompt], settings)
            record = output_record(name.strip(), quantization, str(model.device), "transformers", settings)
            started = time.perf_counter()
            telling = Telling(model, tokenizer, prompt, settings, stop)
            try:
                telling.start()
                shown = None
                while telling.is_alive():
                    telling.join(REFRESH_SECONDS)
                    if telling.so_far and telling.so_far is not shown:
                        shown = telling.so_far
                        yield shown, None
            finally:  # closed early: the next telling must not run beside this one (torch's random generator)
                if telling.is_alive():
                    stop.set()
                    telling.join()
        if telling.error is not None:
            raise telling.error
        stories = telling.stories
        yield [story.text for story in stories], Told(stories, record, time.perf_counter() - started, telling.stopped)

    def save(self, told: Told | None, output_format: str) -> str:
        """The shown stories as a new stories file (.csv or .jsonl) in the playground's temporary folder: its path."""
        if told is None or not told.stories:
            raise UserError("save: no stories yet: tell some first")
        if output_format not in ("csv", "jsonl"):
            raise UserError(f"save: expected csv or jsonl, got {output_format!r}")
        path = Path(tempfile.mkdtemp(dir=self._saved.name)) / f"stories.{output_format}"
        return str(write_stories(path, told.stories, told.record))

    # --- runs ---

    def run_choices(self) -> list[str]:
        """Folders under runs_dir whose trainer_state.json (or a checkpoint's) tells how the run went, newest first."""
        states = {p: run_state_file(p) for p in self._run_folders()}
        return [str(p) for p in newest_first([p for p, state in states.items() if state], lambda p: states[p])]

    def run_report(self, folder: str):
        """(loss figure, run_config.json's contents or None, [[score, value]] from eval_report.json) of a run."""
        folder = (folder or "").strip()
        if not folder:
            raise UserError("run: choose a run folder")
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: no such folder")
        figure = loss_figure(read_log_history(folder), Path(folder).name)
        config = read_json(Path(folder) / "run_config.json")
        report = read_json(Path(folder) / "eval_report.json") or {}
        scores = [[key, report[key]] for key in SCORE_KEYS if isinstance(report.get(key), (int, float))]
        return figure, config, scores


def newest_first(folders: list[Path], dated_by) -> list[Path]:
    """`folders` by the modification time of dated_by(folder), newest first; one that went away meanwhile (a
    checkpoint rotated out by a live run) is left out."""
    times = {}
    for folder in folders:
        try:
            times[folder] = dated_by(folder).stat().st_mtime
        except OSError:
            continue
    return sorted(times, key=times.get, reverse=True)


def read_json(path: Path) -> dict | None:
    """A JSON file's object, None when there is no file; a UserError naming a file that is not one."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({one_line(e, 120)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


# --- the page ---


def import_gradio():
    """gradio, with its usage reports off unless asked for (GRADIO_ANALYTICS_ENABLED): a local tool stays local."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise UserError("gradio is not installed: pip install 'tsg[play]'") from None
    return gradio


def setting_controls(gr) -> list:
    """One control per setting of tsg generate, with its name, help, default and limits."""
    kinds = get_type_hints(Settings)
    controls = []
    for f in SETTINGS_SHOWN:
        default = f.default if f.default is not MISSING else f.default_factory()
        kind, info = kinds[f.name], f.metadata.get("help", "")
        low, high = LIMITS.get(f.name, (None, None))
        common = dict(label=f.name, info=info, elem_id=f"setting-{f.name}")
        if kind is bool:
            controls.append(gr.Checkbox(value=default, **common))
        elif kind in (int, float):
            controls.append(gr.Number(value=default, precision=0 if kind is int else None, minimum=low,
                                      maximum=high, **common))
        elif kind == list[str]:
            controls.append(gr.Textbox(value=", ".join(default), **{**common, "info": info + " Comma-separated."}))
        else:
            controls.append(gr.Textbox(value=default, **common))
    return controls


def build_page(playground: Playground):
    """The Gradio Blocks page of `playground` (launch it, or use it in a test)."""
    gr = import_gradio()
    # delete_cache: Gradio's copies of the saved stories files are kept a day
    with gr.Blocks(title="tsg play", delete_cache=(3600, 86400)) as page:
        gr.Markdown("# tsg play\nTell stories with a model, compare two, and see how a run went.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3), gr.Tabs():
                choices = playground.model_choices()
                with gr.Tab("Tell", id="tell"):
                    tell_tab = lay_out_tell(gr, choices)
                with gr.Tab("Compare", id="compare"):
                    compare_tab = lay_out_compare(gr, choices)
                with gr.Tab("Runs", id="runs"):
                    runs_tab = lay_out_runs(gr, playground.run_choices())
            with gr.Column(scale=1, min_width=260):
                gr.Markdown("### Settings\ntsg generate's options, with its defaults")
                controls = setting_controls(gr)
        ui = SimpleNamespace(**tell_tab, **compare_tab, **runs_tab, controls=controls, told=gr.State(None))
        connect(gr, playground, ui)
    return page


def lay_out_tell(gr, choices: list[str]) -> dict:
    """The Tell tab's components, by name."""
    with gr.Row():
        model = gr.Dropdown(choices, value=choices[0] if choices else None, label="model", allow_custom_value=True,
                            info="A folder saved by tsg train, an adapter run, or a hub name.", elem_id="model")
        quantization = gr.Radio(list(QUANTIZATIONS), value="none", label="quantization",
                                info="Load the weights in 8 or 4 bits (bitsandbytes).", elem_id="quantization")
    prompt = gr.Textbox(value="Once upon a time", label="prompt", lines=2, elem_id="prompt")
    with gr.Row():
        tell = gr.Button("Tell", variant="primary", elem_id="tell")
        stop = gr.Button("Stop", variant="stop", elem_id="stop")
    stories = gr.Textbox(label="stories", lines=12, interactive=False, elem_id="stories")
    status = gr.Markdown(elem_id="status")
    with gr.Row():
        save_format = gr.Radio(["csv", "jsonl"], value="jsonl", label="save as", elem_id="save-format")
        save = gr.Button("Save the stories", elem_id="save")
    saved = gr.File(label="stories file", interactive=False, visible=False, elem_id="saved")
    return dict(model=model, quantization=quantization, prompt=prompt, tell=tell, stop=stop, stories=stories,
                status=status, save_format=save_format, save=save, saved=saved)


def lay_out_compare(gr, choices: list[str]) -> dict:
    """The Compare tab's components, by name (its quantization is the Tell tab's)."""
    first = choices[0] if choices else None
    with gr.Row():
        model_a = gr.Dropdown(choices, value=first, label="model A", allow_custom_value=True, elem_id="model-a")
        model_b = gr.Dropdown(choices, value=choices[1] if len(choices) > 1 else first, label="model B",
                              allow_custom_value=True, elem_id="model-b")
    compare_prompt = gr.Textbox(value="Once upon a time", label="prompt", lines=2, elem_id="compare-prompt")
    with gr.Row():
        compare = gr.Button("Compare", variant="primary", elem_id="compare")
        compare_stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
    with gr.Row():
        story_a = gr.Textbox(label="model A's stories", lines=12, interactive=False, elem_id="story-a")
        story_b = gr.Textbox(label="model B's stories", lines=12, interactive=False, elem_id="story-b")
    compare_status = gr.Markdown(elem_id="compare-status")
    return dict(model_a=model_a, model_b=model_b, compare_prompt=compare_prompt, compare=compare,
                compare_stop=compare_stop, story_a=story_a, story_b=story_b, compare_status=compare_status)


def lay_out_runs(gr, runs: list[str]) -> dict:
    """The Runs tab's components, by name."""
    with gr.Row():
        run = gr.Dropdown(runs, value=None, label="run folder", allow_custom_value=True, elem_id="run")
        refresh_runs = gr.Button("Refresh the list", elem_id="refresh-runs")
    run_plot = gr.Plot(label="loss", elem_id="run-plot")
    run_status = gr.Markdown(elem_id="run-status")
    with gr.Row():
        run_scores = gr.Dataframe(headers=["score", "value"], label="eval_report.json", interactive=False,
                                  elem_id="run-scores")
        run_config = gr.JSON(label="run_config.json", elem_id="run-config")
    return dict(run=run, refresh_runs=refresh_runs, run_plot=run_plot, run_status=run_status, run_scores=run_scores,
                run_config=run_config)


def connect(gr, playground: Playground, ui: SimpleNamespace) -> None:
    """The page's handlers, wired to the components of `ui`."""

    # Gradio passes the request (whose session_hash names the page's Stop) to a parameter annotated gr.Request
    def tell(values: dict, request: gr.Request):
        yield from tell_on_page(playground, ui, values, request.session_hash)

    def compare(values: dict, request: gr.Request):
        yield from compare_on_page(playground, ui, values, request.session_hash)

    def stop(request: gr.Request):
        playground.stop(request.session_hash)

    def save(told: Told | None, output_format: str):
        try:
            n = len(told.stories) if told else 0
            return gr.File(playground.save(told, output_format), visible=True), \
                f"saved {n} {'story' if n == 1 else 'stories'} as {output_format}"
        except Exception as e:  # noqa: BLE001
            return gr.File(None, visible=False), failure(e, "saving")

    telling = {ui.model, ui.quantization, ui.prompt, *ui.controls}  # a set: the handler is given a dict by component
    ui.tell.click(tell, telling, [ui.stories, ui.status, ui.told])
    ui.prompt.submit(tell, telling, [ui.stories, ui.status, ui.told])
    ui.stop.click(stop, None, None, queue=False)
    ui.compare.click(compare, {ui.model_a, ui.model_b, ui.quantization, ui.compare_prompt, *ui.controls},
                     [ui.story_a, ui.story_b, ui.compare_status])
    ui.compare_stop.click(stop, None, None, queue=False)
    ui.save.click(save, [ui.told, ui.save_format], [ui.saved, ui.status])
    ui.run.change(lambda folder: show_run(playground, folder), [ui.run],
                  [ui.run_plot, ui.run_config, ui.run_scores, ui.run_status])
    ui.refresh_runs.click(lambda: gr.Dropdown(choices=playground.run_choices()), None, [ui.run])


def tell_on_page(playground: Playground, ui: SimpleNamespace, values: dict, session: str):
    """Tell's updates of (stories, status line, what was told): the stories as they grow, then the summary."""
    stop = playground.begin(session)
    try:
        settings = settings_from([values[control] for control in ui.controls])
        yield "", "telling…", None
        for texts, told in playground.tell(values[ui.model], values[ui.quantization], values[ui.prompt], settings,
                                           stop):
            yield show_stories(texts), ("telling…" if told is None else summary(told)), told
    except Exception as e:  # noqa: BLE001 (a UserError's line, or one line here and the traceback in the terminal)
        yield "", failure(e, "telling"), None
    finally:
        playground.end(session, stop)


def compare_on_page(playground: Playground, ui: SimpleNamespace, values: dict, session: str):
    """Compare's updates of (model A's stories, model B's, status line): A told, then B, on the same settings."""
    stop = playground.begin(session)
    shown, summaries = ["", ""], []
    try:
        settings = settings_from([values[control] for control in ui.controls])
        for side, name in enumerate((values[ui.model_a], values[ui.model_b])):
            if stop.is_set():
                break
            for texts, told in playground.tell(name, values[ui.quantization], values[ui.compare_prompt], settings,
                                               stop):
                shown[side] = show_stories(texts)
                if told is not None:
                    summaries.append(f"model {'AB'[side]}: " + summary(told))
                yield shown[0], shown[1], f"telling model {'AB'[side]}…"
        both = "both told" if len(summaries) == 2 else "stopped"
        yield shown[0], shown[1], f"{both}, with the same prompt, settings and seed: " + "; ".join(summaries)
    except Exception as e:  # noqa: BLE001
        yield shown[0], shown[1], failure(e, "comparing")
    finally:
        playground.end(session, stop)


def show_run(playground: Playground, folder: str):
    """The Runs tab's (plot, config, scores, status line) for a run folder."""
    try:
        figure, config, scores = playground.run_report(folder)
        note = "" if scores else "no eval_report.json scores (tsg evaluate --model RUN writes them)"
        return figure, config, scores, note
    except Exception as e:  # noqa: BLE001
        return None, None, [], failure(e, "showing the run")


def failure(error: Exception, doing: str) -> str:
    """The status line of a failed action: a UserError's own line; anything else one line (the traceback goes to
    the terminal, where `tsg play` runs)."""
    if isinstance(error, UserError):
        return message(error)
    logger.exception(f"tsg play: {doing} failed")
    return message(f"error: {one_line(error)}")


def summary(told: Told) -> str:
    """What the status line says of stories told: how many, how many tokens, how fast."""
    n, tokens = len(told.stories), sum(story.tokens for story in told.stories)
    return f"{n} {'story' if n == 1 else 'stories'}, {tokens} new tokens in {told.seconds:.1f} s " \
           f"({tokens / max(told.seconds, 1e-9):.0f} tokens/s)" + (", stopped" if told.stopped else "")
