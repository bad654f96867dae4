# make book       execute every chapter on the embedded default (tiny source, CPU) and build the HTML book
# make lab        open the chapters in JupyterLab (run them cell by cell; ipywidgets included)
# make publish    render the committed GPU-executed chapters (book/published) without executing anything
# make test       run the test suite
# make adherence  score the tiny pipeline on held-out prompts (last line: adherence: K/N)
# All set up .venv first (Python 3.11; pins in pyproject.toml and requirements.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The library alone, as a server or another pipeline installs it: no notebook stack (tests/test_core_install.py).
CORE_STAMP := .venv-core/.installed
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: book lab publish test adherence clean

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -e '.[book,serve,test,peers]'
	touch $(STAMP)

$(CORE_STAMP): pyproject.toml requirements.txt
	rm -rf .venv-core
	$(PYTHON) -m venv .venv-core
	.venv-core/bin/python -m pip install -q -r requirements.txt '.[serve]'
	touch $(CORE_STAMP)

book: $(STAMP)
	$(BIN)/python scripts/run_book.py $(ARGS)

lab: $(STAMP)
	$(BIN)/python -m jupyterlab --ip=127.0.0.1 --ServerApp.root_dir=notebooks $(ROOT_FLAG) $(ARGS)

publish: $(STAMP)
	$(BIN)/python scripts/run_book.py --out book/published --build-only --path-output _build/published \
		--title "Status of the published GPU book"

test: $(STAMP) $(CORE_STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

adherence: $(STAMP)
	$(BIN)/python scripts/adherence.py $(ARGS)

clean:
	rm -rf _build book/local .venv-core
