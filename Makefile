# tsg: the two commands that set up and check everything on a fresh machine are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Machines without an NVIDIA GPU get torch pinned first, so that the open `torch` requirement never pulls a
# multi-GB CUDA build. Where the registry pip uses serves CUDA builds under that pin, add the CPU index:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

CONFIG ?= configs/tiny_cpu.json
LAUNCH ?=
ARGS ?=
DATA ?=
DEMO_STEPS ?= 300
PROMPT ?= Once upon a time
MODEL ?=
# Held-out stories for `make eval`: the TinyStories validation file beside the checkout when there is one,
# else the embedded sample (which the demo also trains on: the scores are then optimistic).
VALID ?= $(firstword $(wildcard ../shared/data/tinystories/valid.txt) tsg/sample/tinystories_sample.txt)
TRAIN ?=
# Stories for `make bench`: the TinyStories training file beside the checkout when there is one, else the embedded sample.
BENCH_DATA = $(or $(DATA),$(firstword $(wildcard ../shared/data/tinystories/train.txt) tsg/sample/tinystories_sample.txt))

# The newest folder under runs/ that holds a model or an adapter (shell text for a recipe).
NEWEST_RUN = $$(ls -td runs/*/ 2>/dev/null | while read d; do \
	if [ -f "$$d/config.json" ] || [ -f "$$d/adapter_config.json" ]; then echo "$${d%/}"; break; fi; done)
NO_RUN = no trained model under runs/: run make demo first, or pass MODEL=DIR

.PHONY: install demo train generate merge eval evaluate export play clients bench test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	command -v nvidia-smi >/dev/null 2>&1 || \
		$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev,onnx,play]"
	touch $@

# Train configs/tiny_cpu.json from scratch for DEMO_STEPS steps, then tell stories.
# DATA=PATH trains on a story file instead of the embedded sample; DATA=NAME on a hub data set.
demo: install
	$(BIN)/tsg train configs/tiny_cpu.json --max_steps $(DEMO_STEPS) --overwrite_output_dir true \
		$(if $(DATA),$(if $(wildcard $(DATA)),--train_file $(DATA),--train_file none --dataset_name $(DATA))) $(ARGS)
	$(BIN)/tsg generate --model runs/tiny_cpu --prompt "$(PROMPT)" -n 3

# make train CONFIG=configs/NAME.json [LAUNCH=NAME: launch/NAME.yaml] [ARGS="--max_steps 20"]
train: install
	$(BIN)/accelerate launch $(if $(LAUNCH),--config_file launch/$(LAUNCH).yaml,--num_processes 1) \
		tsg/train.py $(CONFIG) $(ARGS)

# make generate PROMPT="Once upon a time" [MODEL=DIR, default: the newest run under runs/] [ARGS="-n 3"]
# An adapter run is merged into its base once (DIR/merged) and reused.
generate: install
	@model="$(MODEL)"; [ -n "$$model" ] || model=$(NEWEST_RUN); \
	if [ -z "$$model" ]; then echo "make generate: $(NO_RUN)" >&2; exit 2; fi; \
	echo "make generate: model $$model"; \
	$(BIN)/tsg generate --model "$$model" --prompt "$(PROMPT)" $(ARGS)

# make merge RUN=runs/qlora_cpu [OUT=runs/qlora_cpu-merged]
merge: install
	@[ -n "$(RUN)" ] || { echo "make merge: RUN=DIR is required (an adapter run, e.g. runs/qlora_cpu)" >&2; exit 2; }
	$(BIN)/tsg merge $(RUN) $(or $(OUT),$(RUN)-merged)

# make eval [MODEL=DIR, default: the newest run under runs/] [VALID=valid.txt] [TRAIN=train.txt] [ARGS="--max_stories 500"]
# Writes MODEL/eval_report.json: held-out loss, perplexity and bits per byte, and generated-story scores.
eval: install
	@model="$(MODEL)"; [ -n "$$model" ] || model=$(NEWEST_RUN); \
	if [ -z "$$model" ]; then echo "make eval: $(NO_RUN)" >&2; exit 2; fi; \
	echo "make eval: model $$model, held-out stories $(VALID)"; \
	$(BIN)/tsg evaluate --model "$$model" --data "$(VALID)" $(if $(TRAIN),--train_data "$(TRAIN)") $(ARGS)

evaluate: eval

# make export MODEL=runs/tiny_cpu [FORMAT=gguf|onnx] [OUTTYPE=f32|f16|q8_0] [ARGS="--output FILE"]: a GGUF file for
# llama.cpp or an ONNX folder (MODEL/onnx/model.onnx), kept only when its logits and token ids check out.
FORMAT ?= gguf
OUTTYPE ?= f32
export: install
	@model="$(MODEL)"; [ -n "$$model" ] || model=$(NEWEST_RUN); \
	if [ -z "$$model" ]; then echo "make export: $(NO_RUN)" >&2; exit 2; fi; \
	$(BIN)/tsg export "$$model" --format $(FORMAT) --outtype $(OUTTYPE) $(ARGS)

# make play [MODEL="runs/tiny_cpu runs/other"] [PORT=7860] [ARGS="--host 0.0.0.0"]: the story playground in the browser,
# at http://127.0.0.1:PORT (the models named first, then every model under runs/).
PORT ?= 7860
play: install
	$(BIN)/tsg play $(MODEL) --port $(PORT) $(ARGS)

# make clients: what the optional client tests run against, built once into CLIENTS (outside the repo, ~25 minutes
# on 2 cores): llama.cpp's llama-completion and llama-tokenize from the llama-cpp-python source distribution on PyPI
# (it vendors llama.cpp), the `llamacpp` extra in the venv (llama-cpp-python, for `tsg generate --backend llama.cpp`),
# and a transformers 4.57 environment that loads the folders tsg saves. The tests look there (TSG_CLIENTS) and skip
# what is not built.
CLIENTS ?= $(HOME)/.cache/tsg/clients
LLAMA_CPP = $(CLIENTS)/llama.cpp
TRANSFORMERS4 = $(CLIENTS)/transformers4
clients: install $(LLAMA_CPP)/build/bin/llama-completion $(VENV)/.llamacpp $(TRANSFORMERS4)/.installed
	@echo "make clients: llama.cpp in $(LLAMA_CPP), llama-cpp-python in $(VENV), transformers 4.57 in $(TRANSFORMERS4)"

$(LLAMA_CPP)/build/bin/llama-completion: | $(VENV)/.installed
	set -e; mkdir -p "$(CLIENTS)/src"; \
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python -d "$(CLIENTS)/src"; \
	sdist=$$(ls -t "$(CLIENTS)"/src/llama_cpp_python-*.tar.gz | head -1); tar -xzf "$$sdist" -C "$(CLIENTS)/src"; \
	rm -rf "$(LLAMA_CPP)"; cp -r "$${sdist%.tar.gz}/vendor/llama.cpp" "$(LLAMA_CPP)"; \
	cmake -S "$(LLAMA_CPP)" -B "$(LLAMA_CPP)/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF > "$(CLIENTS)/cmake.log"; \
	cmake --build "$(LLAMA_CPP)/build" -j$$(nproc) --target llama-completion llama-tokenize > "$(CLIENTS)/build.log"

# pip builds llama-cpp-python from source (minutes) and keeps the wheel in its cache
$(VENV)/.llamacpp: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[dev,onnx,play,llamacpp]"
	touch $@

$(TRANSFORMERS4)/.installed:
	test -x $(TRANSFORMERS4)/bin/python || $(PYTHON) -m venv $(TRANSFORMERS4)
	$(TRANSFORMERS4)/bin/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(TRANSFORMERS4)/bin/python -m pip install --quiet "transformers==4.57.*" safetensors
	touch $@

# make bench [DATA=stories.txt] [ARGS="--only generation"]: throughput, MFU, memory and generation speed, measured
# side by side; prints a table and writes bench-results.json (~30 min on 2 cores, half of it tokenizing ~2.6 GB of repeated stories: ARGS="--scale_megabytes 0" skips that).
bench: install
	$(BIN)/tsg bench --data "$(BENCH_DATA)" --output bench-results.json $(ARGS)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs wandb .pytest_cache
