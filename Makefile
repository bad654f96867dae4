# make book     execute every chapter on the embedded default (tiny source, CPU) and build the HTML book
# make test     run the test suite
# Both set up .venv first (Python 3.11; pins in pyproject.toml and requirements.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book test publish clean

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -e '.[book,test]'
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/python scripts/run_book.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf _build book/local
