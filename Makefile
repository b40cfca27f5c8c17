# Two commands do all the set-up on a fresh clone:
#   make run    create .venv when missing, run the pipeline (snakemake --cores all) and write
#               its HTML report (results/report.html)
#   make test   create .venv when missing, then run the test suite
#   make test-fast   the inner loop: every test that runs no subprocess pipeline (pytest -m "not e2e")
#   make docs   the documentation site (docs/, mkdocs.yml) built strictly and offline into site/
# Both are idempotent: the environment is rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
# pytest-xdist workers: two cut the suite's time on 2 cores (benchmarks/RESULTS.md). A test file
# runs on one worker (--dist loadfile), so a module's end-to-end fixture is made once.
TEST_WORKERS ?= 2
PYTEST := python -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: run test test-fast docs lint clean-env device-check

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test,finetune]'
	touch $(STAMP)

run: $(STAMP)
	. $(VENV)/bin/activate && snakemake --cores all && snakemake --report results/report.html

test: $(STAMP)
	. $(VENV)/bin/activate && $(PYTEST)

test-fast: $(STAMP)
	. $(VENV)/bin/activate && $(PYTEST) -m "not e2e"

docs: $(STAMP)
	. $(VENV)/bin/activate && python docs/gen_config_reference.py && \
		NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir site

lint: $(STAMP)
	. $(VENV)/bin/activate && snakemake --lint

clean-env:
	rm -rf $(VENV)

# gpu.sh --smoke as the GPU machine runs it: Python 3.12, torch 2.11 and the machine's other packages
# in an ignored .device-venv/, no project .venv (benchmarks/device_check.sh). Not part of make test.
device-check:
	bash benchmarks/device_check.sh
