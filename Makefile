# Set-up is two commands: `make demo` and `make test` (see README.md).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test install firmware clean bench

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/emu run firmware/bin/x86_64/demo.elf --kprobe do_sys_open --kprobe parse_packet
	$(BIN)/emu run firmware/bin/arm64/demo.elf --kprobe do_sys_open --kprobe parse_packet

test: $(STAMP)
	$(BIN)/pytest -n auto -p no:cacheprovider tests 2>/dev/null || $(BIN)/pytest tests

firmware:
	$(MAKE) -C firmware

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
