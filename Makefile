# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
QTOOL  := $(VENV)/bin/qtool
STAMP  := $(VENV)/.qtool-installed
OUT    ?= out

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

# quantize -> export -> eval on the bundled Gemma-3-270M (built once into ~/.cache/qtool)
demo: setup
	@mkdir -p $(OUT)
	$(QTOOL) models
	$(QTOOL) quantize gemma-3-270m --scheme w4a16 --method gptq --group-size 128 --format gptq --out $(OUT)/gemma-3-270m-w4a16-gptq --force
	$(QTOOL) export $(OUT)/gemma-3-270m-w4a16-gptq --format qtool --out $(OUT)/gemma-3-270m-w4a16-qtool --force
	$(QTOOL) inspect $(OUT)/gemma-3-270m-w4a16-qtool
	$(QTOOL) eval $(OUT)/gemma-3-270m-w4a16-qtool --max-ppl-increase 40

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(OUT)
