"""`tsg play`: the story playground in the browser (tsg.playground): tell stories as they grow, compare two models on
the same seed, and see a run's loss curves.

    tsg play runs/tiny_cpu                         # http://127.0.0.1:7860
    tsg play runs/tiny_cpu runs/qlora_cpu --port 8080
    tsg play --host 0.0.0.0                        # every model under runs/, reachable from other machines
    make play MODEL=runs/tiny_cpu

MODEL ...: the models offered first (folders saved by tsg train, adapter runs, hub names); the model folders under
runs_dir follow, and any other can be typed on the page. The page is served on 127.0.0.1 only unless --host says
otherwise; --share true also asks Gradio for a public link (off by default). Needs `pip install 'tsg[play]'`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from tsg.config import Command, option, run
from tsg.files import UserError
from tsg.generation import check_model_name, pick_device
from tsg.playground import Playground, build_page, import_gradio

logger = logging.getLogger("tsg")


@dataclass
class PlayArguments:
    models: Optional[list[str]] = option(None, "Models offered first on the page (the model folders under runs_dir "
                                         "follow).")
    host: str = option("127.0.0.1", "Address to serve on (0.0.0.0: every network interface).")
    port: int = option(7860, "Port to serve on.")
    share: bool = option(False, "Also ask Gradio for a public share link.")
    runs_dir: str = option("runs", "Folder whose runs the page lists.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    trust_remote_code: bool = option(False, "Run Python code a model folder names (auto_map in its config).")
    allow_changed_base: bool = option(False, "Merge an adapter run even into a base it was not trained on.")

    def __post_init__(self):
        self.models = self.models or []
        for name in self.models:
            check_model_name(name)
        if not 1 <= self.port <= 65535:
            raise UserError(f"port: expected an integer from 1 to 65535, got {self.port}")
        pick_device(self.device)


PLAY = Command(name="play", types=(PlayArguments,), description=__doc__, positional=("models",))


def play(options: PlayArguments) -> None:
    import_gradio()  # before anything is built: the one-line install hint
    playground = Playground(options.models, options.runs_dir, options.device, options.trust_remote_code,
                            options.allow_changed_base)
    page = build_page(playground)
    logger.info("serving on http://%s:%d (Ctrl-C stops)", options.host, options.port)
    try:
        page.queue().launch(server_name=options.host, server_port=options.port, share=options.share,
                            inbrowser=False, show_error=False, quiet=True)
    except OSError as e:
        raise UserError(f"port {options.port}: cannot serve there ({e}): choose another with --port") from None


def main(argv: list[str] | None = None) -> None:
    run(PLAY, play, argv)


if __name__ == "__main__":
    main()
