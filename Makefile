# make test  — create .venv, install the project, its dev tools and the cluster extra, run the test suite
# make demo  — create .venv, install, run a scripted agent over stdio on the embedded demo model (CPU, ~1 min)
# make bench — the CPU benchmark (batched server vs naive path; demo model if installed, else tiny), a few minutes
# make test-slow — the suite with the full-count reliability runs (fuzz, soak, memory; see docs/reliability.md)
# make bench-full-size — the 7B's shapes on this CPU (random weights under /work/fullsize/ckpt, ~15 GB): load time,
#   peak memory, stage timings, decode ms/token against the memory-bandwidth floor, in bfloat16 and int8
# make bench-cpu-kernels — the decode step's CPU kernels beside torch's at the 7B's shapes (speed and error), ~1 min
# make bench-cluster — req/s of the server on Ray Serve with 1 and 2 model replicas against the single process
#                     (installs the cluster extra, ray[serve] and redis; needs redis-server), a few minutes
# make lint  — ruff (lint, complexity, format) on every package, pyright (strict on mcp_server/), tools_schema/ drift
# The torch wheels are named explicitly: this machine's pip serves a CUDA build of torch 2.14.1 with a matching
# torchvision from local files (segment-anything needs torchvision). Override TORCH_SPEC elsewhere.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
CLUSTER_STAMP := $(VENV)/.cluster-installed
LINTED := nextchat mcp_server benchmarks examples tests

.PHONY: test test-slow demo lint install clean bench bench-cluster bench-full-size bench-cpu-kernels install-cluster

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The tests take the cluster extra too, so tests/cluster/ runs (with redis-server installed) instead of skipping.
test: $(CLUSTER_STAMP)
	$(PY) -m pytest

test-slow: $(CLUSTER_STAMP)
	$(PY) -m pytest --run-slow

demo: $(STAMP)
	$(PY) examples/agent_workflow.py --out demo_output

# The bench extra (matplotlib, for the plot) is part of the dev extra that $(STAMP) installs: nothing more to install.
bench: $(STAMP)
	$(PY) -m benchmarks.bench --preset auto --device cpu

# The cluster extra (ray[serve], redis) for the targets that use it; `make demo` (and the server itself) needs neither.
$(CLUSTER_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,cluster]'
	touch $(CLUSTER_STAMP)

install-cluster: $(CLUSTER_STAMP)

bench-cluster: $(CLUSTER_STAMP)
	$(PY) -m benchmarks.cluster

bench-full-size: $(STAMP)
	nice -n 5 $(PY) -m benchmarks.full_size

bench-cpu-kernels: $(STAMP)
	$(PY) -m benchmarks.cpu_kernels

# pyright reads mcp_server/cluster/ and mcp_server/redis_store.py, which import the cluster extra.
lint: $(CLUSTER_STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/pyright
	$(PY) -m mcp_server.schema_files --check

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache demo_output
