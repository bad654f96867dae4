# make book     execute every chapter on the embedded default (tiny source, CPU) and build the HTML book
# make publish  render the committed GPU-executed chapters (book/published) without executing anything
# make test     run the test suite
# make adherence  score the tiny pipeline on held-out prompts (last line: adherence: K/N)
# Both set up .venv first (Python 3.11; pins in pyproject.toml and requirements.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book publish test adherence clean

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -e '.[book,test]'
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/python scripts/run_book.py $(ARGS)

publish: $(STAMP)
	$(BIN)/python scripts/run_book.py --out book/published --build-only --path-output _build/published \
		--title "Status of the published GPU book"

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

adherence: $(STAMP)
	$(BIN)/python scripts/adherence.py $(ARGS)

clean:
	rm -rf _build book/local
