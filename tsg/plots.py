"""Pictures of a training run: its loss curves from the Trainer's log history (`trainer_state.json`).

    write_loss_plot("runs/tiny_cpu")        # runs/tiny_cpu/loss.png: training and evaluation loss against steps

Every `tsg train` run leaves `loss.png` in its folder, so the curve is there without W&B; `tsg play`'s Runs tab draws
the same figure for any run folder, a run still under way included (its newest checkpoint's state).
"""

from __future__ import annotations

import json
from pathlib import Path

from tsg.files import UserError, one_line, replaced_atomically

STATE = "trainer_state.json"
PLOT = "loss.png"


def run_state_file(folder: str | Path) -> Path | None:
    """The trainer_state.json that tells how a run went: the finished run's, else its newest checkpoint's."""
    folder = Path(folder)
    if (folder / STATE).is_file():
        return folder / STATE
    checkpoints = [p for p in folder.glob("checkpoint-*/" + STATE) if p.parent.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.parent.name.split("-")[-1]), default=None)


def read_log_history(folder: str | Path) -> list[dict]:
    """The Trainer's log_history of the run in `folder` (a UserError naming the file when there is none)."""
    path = run_state_file(folder)
    if path is None:
        raise UserError(f"{folder}: no {STATE} (not a training run, or no checkpoint saved yet)")
    try:
        history = json.loads(path.read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: cannot read the run's log history ({one_line(e, 120)})") from None
    return [entry for entry in history if isinstance(entry, dict) and "step" in entry]


def curves(history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{name: (steps, values)} for the training loss, the evaluation loss and bits per byte that were logged."""
    found = {}
    for key, name in (("loss", "training loss"), ("eval_loss", "evaluation loss"),
                      ("eval_bits_per_byte", "evaluation bits per byte")):
        points = [(entry["step"], entry[key]) for entry in history if isinstance(entry.get(key), (int, float))]
        if points:
            found[name] = ([step for step, _ in points], [value for _, value in points])
    return found


def loss_figure(history: list[dict], title: str = ""):
    """A matplotlib Figure: training and evaluation loss against steps, and bits per byte beside them when the
    evaluations logged it. A history without losses gives a figure that says so."""
    from matplotlib.figure import Figure  # not pyplot: no backend (and no screen) is needed, nor changed

    found = curves(history)
    bpb = found.pop("evaluation bits per byte", None)
    figure = Figure(figsize=(10 if bpb else 6, 4), layout="constrained")
    axes = figure.subplots(1, 2 if bpb else 1, squeeze=False)[0]
    for name, (steps, values) in found.items():
        axes[0].plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
    axes[0].set(xlabel="step", ylabel="loss (nats per token)", title=title or "loss")
    if found:
        axes[0].legend()
    else:
        axes[0].text(0.5, 0.5, "no losses logged yet", ha="center", va="center", transform=axes[0].transAxes)
    axes[0].grid(alpha=0.3)
    if bpb:
        axes[1].plot(*bpb, marker="o", markersize=3, color="tab:green")
        axes[1].set(xlabel="step", ylabel="bits per byte", title="evaluation bits per byte")
        axes[1].grid(alpha=0.3)
    return figure


def write_loss_plot(folder: str | Path) -> Path:
    """FOLDER/loss.png (atomically) from the run's log history."""
    path = Path(folder) / PLOT
    figure = loss_figure(read_log_history(folder), Path(folder).name)
    with replaced_atomically(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return path
