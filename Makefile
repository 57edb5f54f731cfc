# FineViT: two commands on a fresh machine.
#   make demo   the whole loop, offline on CPU (scripts/demo.sh): data -> a captioner -> recaption ->
#               filter + audit -> stage 1 on alt-text vs recaptions -> stage 2 -> eval -> report
#   make demo-audit  the quick look (a minute): synthetic scenes -> ingest -> summary -> audit SQL + report
#   make test   the whole suite
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
export RAY_AUTH_MODE ?= disabled
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
DEMO_DIR ?= demo_out

.PHONY: setup test test-fast test-chaos lint format demo demo-screenshot demo-audit bench-deps bench-quick clean image image-sglang

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, the CPU build from this disk; anything else would pull CUDA
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# the suite cross-checks against OpenCLIP and CLIP_benchmark, so it installs them (.bench-deps/, --no-deps)
test: bench-deps
	$(BIN)/python -m pytest -q -ra --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow"

# the reliability suite (RELIABILITY.md); its figures go to $FINEVIT_CHAOS_FIGURES
test-chaos: setup
	$(BIN)/python -m pytest -q -ra tests/chaos

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The whole loop; a rerun resumes (finished steps are skipped: rm -r $(DEMO_DIR) to start over).
# It exits non-zero when a claimed margin is not met (README's first section).
demo: setup
	PATH=$(CURDIR)/$(BIN):$$PATH DEMO_DIR=$(DEMO_DIR) scripts/demo.sh

# The report as headless Chromium draws it (needs a Chromium: apt-get install chromium)
demo-screenshot: setup
	$(BIN)/python scripts/screenshot_report.py $(DEMO_DIR)/report.html $(DEMO_DIR)/report.png

demo-audit: setup
	rm -rf $(DEMO_DIR)-audit
	$(BIN)/finevit ingest 'synthetic://scenes?n=200&seed=0&size=384' $(DEMO_DIR)-audit/data --samples-per-shard 50
	$(BIN)/finevit info $(DEMO_DIR)-audit/data
	@echo "--- what a web alt-text says vs the dense ground truth a recaptioner aims for:"
	$(BIN)/finevit audit $(DEMO_DIR)-audit/data --sql "SELECT s.key, s.caption AS alt_text, left(g.caption, 160) || ' ...' AS dense_caption FROM samples s JOIN layer_gt_global g USING (key) ORDER BY s.key LIMIT 3"
	$(BIN)/finevit audit $(DEMO_DIR)-audit/data --report $(DEMO_DIR)-audit/report
	@echo "--- open $(DEMO_DIR)-audit/report/report.html"

# OpenCLIP (the CPU training anchor of bench/train_throughput_cpu.py, and the loader that
# tests/engine/test_ingest.py runs over our shards) goes into .bench-deps with --no-deps, never
# into the project's dependencies. torchvision 0.28.0 is the release built for torch 2.13.0 (its
# metadata requires torch==2.13.0; 0.29.x is for 2.14), but PyPI only has CUDA builds of it: its
# compiled ops link libtorch_cuda.so, so beside torch 2.13 CPU `import torchvision` fails with
# "operator torchvision::nms does not exist" (checked: pip download --no-deps torchvision==0.28.0).
# That is why the two users put empty stand-ins for torchvision._meta_registrations and
# torchvision._autograd_registrations in sys.modules before importing open_clip: OpenCLIP uses
# only torchvision's pure-Python transforms. webdataset 0.2.86: OpenCLIP's trainer breaks on
# newer releases (KeyError 'fname' in its group_by_keys); the project itself keeps img2dataset's.
# clip-benchmark (+ scikit-learn <1.8: no narwhals; joblib, threadpoolctl, cloudpickle): the eval
# cross-check (tests/eval/test_clip_benchmark.py, skipped without it) and bench/eval_throughput.py.
bench-deps: setup
	test -d .bench-deps/open_clip_train -a -d .bench-deps/webdataset -a -d .bench-deps/clip_benchmark || $(BIN)/pip install -q --no-deps \
		--target .bench-deps open_clip_torch==3.3.0 torchvision==0.28.0 webdataset==0.2.86 ftfy wcwidth \
		clip-benchmark==1.6.2 scikit-learn==1.7.2 joblib threadpoolctl cloudpickle

bench-quick: bench-deps
	for b in bench/*.py; do $(BIN)/python $$b --quick || exit 1; done

# Container images for a cluster (infra/Dockerfile, CUDA base): the project with its GPU extras.
# vLLM and SGLang need different flashinfer builds, hence two images (both on pyproject's torch:
# infra/check_pins.py); SGLang also needs NVIDIA's index (infra/gpu-pins.json). IMAGE_REPO=... to push elsewhere.
IMAGE_REPO ?= ghcr.io/finevit
IMAGE_TAG ?= latest
image:
	DOCKER_BUILDKIT=1 docker build -f infra/Dockerfile --build-arg EXTRAS=vllm,gpu -t $(IMAGE_REPO)/finevit:$(IMAGE_TAG) .

image-sglang:
	DOCKER_BUILDKIT=1 docker build -f infra/Dockerfile --build-arg EXTRAS=sglang --build-arg EXTRA_INDEX_URL=https://pypi.nvidia.com -t $(IMAGE_REPO)/finevit-sglang:$(IMAGE_TAG) .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
