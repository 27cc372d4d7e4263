# The two commands of the README, and the pieces they are made of.
#   make demo   - set everything up, then run the demo on localhost
#   make test   - set everything up, then run every test (C under ASan/UBSan, pytest, ruff)
# Everything lands in .venv/ and build/; `make clean` removes both.
# pccl is installed editable: the checkout's pccl/ is the imported package
# (edits to Python files take effect at once); its compiled extension is
# built in build/editable/ (installed into .venv), rebuilt by `make install`
# when a C source changes.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch on these machines (pinned in pyproject.toml; checked below).
TORCH  := torch==2.13.0
JOBS   ?= 2

# What the compiled extension is built from (Python files need no reinstall).
NATIVE_SOURCES := pyproject.toml CMakeLists.txt tools/gen_ffi.py $(shell find native/include native/src native/CMakeLists.txt -type f 2>/dev/null)

.PHONY: all demo test test-c test-py lint bench install clean

all: install

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The requirements pyproject.toml names (build backend, runtime, the "dev"
# extra with its pccl[...] references expanded), read from it so that this
# file never repeats the list.  torch is pinned there (the CPU build).
define PYPROJECT_REQUIREMENTS
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
extras = project["project"]["optional-dependencies"]
def expand(extra):
    for req in extras[extra]:
        if req.startswith("pccl["):
            for name in req[len("pccl["):-1].split(","):
                yield from expand(name.strip())
        else:
            yield req
reqs = project["build-system"]["requires"] + project["project"]["dependencies"]
print("\n".join(dict.fromkeys(reqs + list(expand("dev")))))
endef
export PYPROJECT_REQUIREMENTS

# Third-party packages first (slow, rarely change), then pccl itself.
$(VENV)/.deps: $(VENV)/bin/activate pyproject.toml
	$(PY) -c "$$PYPROJECT_REQUIREMENTS" > $(VENV)/requirements.txt
	grep -qx '$(TORCH)' $(VENV)/requirements.txt  # a bare "torch" would download CUDA wheels
	$(PIP) install --quiet -r $(VENV)/requirements.txt
	touch $@

# An editable install (scikit-build-core's redirect mode, settings in
# pyproject.toml [tool.scikit-build]): an import hook in .venv maps `pccl`
# to this checkout's pccl/ and `pccl._pccl_native` to the extension built
# in build/editable/ and copied into .venv (an incremental build when re-run).
$(VENV)/.installed: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

# C tests alone, under AddressSanitizer + UndefinedBehaviorSanitizer.
test-c:
	cmake -S native -B build/asan -DPCCL_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
	cmake --build build/asan -j$(JOBS)
	ctest --test-dir build/asan --output-on-failure -j$(JOBS)

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check pccl tests benchmarks examples tools

test-py: install
	$(VENV)/bin/pytest -q

test: test-c lint test-py

# A pccl-master and three peers training a character-level language model
# with DiLoCo; one peer is SIGKILLed a third into the run, a new one joins and
# catches up through shared state, and training carries on to the end.
demo: install
	$(PY) examples/diloco_train.py --local 3 --chaos --outer-steps 9 --out-dir build/demo

bench: install
	$(PY) benchmarks/allreduce_loopback.py

clean:
	rm -rf $(VENV) build

# Fuzzing the wire decoders and the ring's receive path with libFuzzer
# (native/fuzz/README.md); installs clang + libclang-rt-14-dev with apt-get
# when missing (skips loudly without apt).  Regression inputs in
# native/fuzz/regressions/ are replayed first; a crash is added there.
#   make fuzz-smoke   - ~20 s per harness (CI)
#   make fuzz         - FUZZ_SECONDS per harness (default 300), corpus kept in build/fuzz/
FUZZ_SECONDS ?= 300
.PHONY: fuzz fuzz-smoke
fuzz-smoke:
	sh native/fuzz/run.sh 20

fuzz:
	sh native/fuzz/run.sh $(FUZZ_SECONDS)
