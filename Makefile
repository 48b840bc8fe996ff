# Set-up is two commands: `make demo` and `make test` (see README.md).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FW      := firmware/bin

.PHONY: demo test test-fast typecheck mypy-baseline install firmware clean bench sweep

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,plot,net,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@echo "== kprobes, a kretprobe and a boosted/simulated mix on x86-64 and arm64 firmware"
	$(BIN)/emu run $(FW)/x86_64/demo.elf --kprobe do_sys_open --kprobe parse_packet --kretprobe fib > /dev/null
	$(BIN)/emu run $(FW)/arm64/demo.elf --kprobe do_sys_open --kprobe parse_packet --kretprobe fib > /dev/null
	@echo "== how a probe patches the guest: breakpoint, slot, simulation, jump optimization"
	$(BIN)/emu inspect $(FW)/arm64/demo.elf do_sys_open t_adr
	$(BIN)/emu inspect --optimize $(FW)/x86_64/demo.elf do_sys_open
	@echo "== the function tracer on an ftrace build"
	$(BIN)/emu run --cycles $(FW)/x86_64/callpath.ftrace.elf --ftrace-filter 'do_sys_open,getname*' --trace-out /dev/stdout | grep -m6 ' <-'

# Everything: the type check against its baseline, then the whole suite.
test: typecheck
	$(BIN)/pytest tests

# What to run while working: the suite without the tests marked `slow`, on every core
# (pytest-xdist; under 2 minutes on 2 cores).
test-fast: $(STAMP)
	$(BIN)/pytest tests -m "not slow" -n auto

# mypy on emu/ and probes/ ([tool.mypy]); fails on an error not in mypy-baseline.txt.
typecheck: $(STAMP)
	$(BIN)/python tools/mypy_check.py

# Rewrite mypy-baseline.txt with today's errors (after fixing some: it only shrinks).
mypy-baseline: $(STAMP)
	$(BIN)/python tools/mypy_check.py --update

firmware:
	$(MAKE) -C firmware

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_machine.py
	$(BIN)/python benchmarks/bench_kprobes.py
	$(BIN)/python benchmarks/bench_overhead.py --arch all
	$(BIN)/python benchmarks/bench_cycles.py
	$(BIN)/python benchmarks/bench_bpf.py

sweep: $(STAMP)
	$(BIN)/python benchmarks/sweep_all.py --jobs 2

clean:
	rm -rf $(VENV) build *.egg-info
