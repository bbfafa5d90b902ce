# vitserve: `make test` sets everything up from nothing and runs the fast tier.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= models.yaml
REPO ?= model_repository
PYTEST_ARGS ?=

RANDOM_INIT ?=
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001

.PHONY: setup perf-deps test test-slow lint format engines serve api demo perf clean
.PHONY: image engines-gpu gpu-check
.PHONY: cluster-deps cluster-demo

setup: $(STAMP) perf-deps cluster-deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e '.[all,dev]'
	@touch $@

# perf_analyzer (tritonclient 2.51) links Debian's libb64.
perf-deps:
	@if ldconfig -p 2>/dev/null | grep -q libb64.so.0d; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q libb64-0d >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libb64-0d >/dev/null; }; \
	else echo "NOTE: perf_analyzer needs libb64: run 'sudo apt-get install libb64-0d' (Debian/Ubuntu)"; fi

test: setup
	$(BIN)/pytest -m "not slow and not gpu" --durations=25 $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/pytest -m "slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Every model of $(CONFIG) -> $(REPO): export, FP16/INT8/CPU-INT8 variants, TensorRT engines (or build.sh).
# Offline (no pretrained download): make engines RANDOM_INIT=1  (untrained weights, loudly labelled)
engines: setup
	$(BIN)/vitserve build --config $(CONFIG) --repository $(REPO) $(if $(RANDOM_INIT),--random-init)

# The real tritonserver (CPU build from nvidia-pytriton) on $(REPO); Ctrl-C stops it. Control APIs behind
# $$VITSERVE_API_KEY or the key file it prints; OPEN_APIS=statistics,shared-memory,model-repository for make perf.
serve: setup
	$(BIN)/vitserve serve --repository $(REPO) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) \
	  $(if $(OPEN_APIS),--open-apis $(OPEN_APIS))

# The OpenAI-compatible embeddings endpoint (vitserve api) in front of the running server (after make serve):
# POST /v1/embeddings, GET /v1/models on 127.0.0.1:$(API_PORT); bearer key $$VITSERVE_EMBEDDINGS_KEY or the key
# file it prints. README "Text and search".
API_PORT ?= 9000
TRITON_URL ?= localhost:$(GRPC_PORT)
api: setup
	$(BIN)/vitserve api --port $(API_PORT) --triton-url $(TRITON_URL)

# The default model end to end: build (random-init weights when offline, loudly), serve, classify, stop.
demo: setup
	$(BIN)/vitserve demo --config $(CONFIG) --repository $(REPO)

# Latency/throughput sweep of the running server (make serve OPEN_APIS=statistics,shared-memory,model-repository:
# perf_analyzer cannot send the API key over gRPC) for the default model: perf_analyzer and
# the built-in generator, each model against its own ONNX in-process; report in perf/results/$(PERF_MODEL)/.
PERF_MODEL ?= vitb32
PERF_IMAGES ?= artifacts/perf_images
perf: setup
	$(BIN)/python -c "from vitserve.exporter.samples import write_eval_images as w; w('$(PERF_IMAGES)')"
	$(BIN)/vitserve perf --url localhost:$(GRPC_PORT) --model $(PERF_MODEL) \
	  $$($(BIN)/python -m vitserve.exporter.repository --published-backbones $(PERF_MODEL) $(REPO) | sed 's/^/--model /') \
	  --concurrency 1,2,4 --batch 1,8 --generator both --duration-s 5 \
	  --max-total-s 900 --images $(PERF_IMAGES) --repository $(REPO) \
	  --out perf/results/$(PERF_MODEL)

# The GPU path (a GPU host with Docker + the NVIDIA container toolkit). The NGC release comes from
# exporter/gpu_release.py only, its TensorRT from the image itself; DRY_RUN=1 prints every
# docker/trtexec/perf_analyzer command.
GPU_CONFIG ?= models.gpu.yaml
GPU_CHECK = $(BIN)/python -m vitserve.perf.gpu_check $(if $(DRY_RUN),--dry-run)
# The serving image: nvcr.io/nvidia/tritonserver:<release>-py3 + vitserve + the TensorRT Python package of
# the image's own libnvinfer (recorded in /opt/vitserve/tensorrt.json).
image: setup
	$(GPU_CHECK) image
# Build + verify every TensorRT plan of $(REPO) inside that image on this host's GPU (after make engines).
engines-gpu: setup
	$(GPU_CHECK) engines-gpu --config $(GPU_CONFIG) --repository $(REPO)
# Image, engines, verification, perf_analyzer sweep -> perf/results/gpu-<gpu name>/report.md.
gpu-check: setup
	$(GPU_CHECK) all --config $(GPU_CONFIG) --repository $(REPO) $(if $(RANDOM_INIT),--random-init)

# Scale out (deploy/, README "Scale out"): the cluster rehearsal needs Debian's nginx-light and prometheus.
CLUSTER_DEBS = nginx-light prometheus
cluster-deps:
	@missing=""; \
	{ command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; } || missing="$$missing nginx-light"; \
	{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || missing="$$missing prometheus"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null; }; \
	else echo "NOTE: the cluster rehearsal needs Debian's$$missing: run 'sudo apt-get install$$missing'"; fi

# moto S3 + 3 tritonserver replicas loading from s3:// + nginx + prometheus on 127.0.0.1; SIGKILL one replica
# and terminate another under load; prints the table (builds the default model first if needed).
cluster-demo: setup
	$(BIN)/vitserve cluster-demo --config $(CONFIG) --repository $(REPO)

clean:
	rm -rf artifacts $(REPO)/*/ .pytest_cache
