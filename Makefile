# make demo   - install, build the sample shards, train a tiny CLIP on CPU, evaluate it, curate the sample with it
# make test   - install, lint and check formatting (ruff), run the test suite (what CI runs)
# make shards [SOURCES=yamls/data/merged2b.yaml SHARDS_ARGS="key=value ..."] - img2dataset -> MDS, on Spark
#                                                      (local[*]; SPARK_MASTER=spark://host:7077 for a cluster)
# make train  [TRAIN=yamls/flip_l14.yaml NPROC=8 ARGS="key=value ..."]
# make eval   [EVAL=yamls/eval/zeroshot.yaml ARGS="load_path=RUN_DIR_OR_CHECKPOINT"]  (default: runs/demo)
# make bench  - FLIP masking / checkpointing / flash attention throughput table
# make scaling [SWEEP_ARGS="key=value ..."] - the toy scaling sweep on the sample (3 seeds), then its power-law fits:
#                                             all configurations, and those out of chance (error <= 0.5)
# make ablate  [SWEEP_ARGS="key=value ..."] - FLIP's Table 1 ablations on the sample at equal samples seen,
#                                             5 seeds of 100-batch runs (under 30 min on 2 cores), then their
#                                             tables and plot (runs/sweeps/flip_ablation/report.*)
# make ablate-flops [SWEEP_ARGS=...]        - the same rows at equal training FLOPs (runs/sweeps/flip_ablation_flops/)

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SOURCES ?= yamls/data/sample.yaml
TRAIN   ?= yamls/demo_cpu.yaml
EVAL    ?= yamls/eval/zeroshot.yaml
NPROC   ?= 1
ARGS    ?=
SHARDS_ARGS ?=
SWEEP_ARGS ?=
# pytest-xdist workers for `make test` (the suite is measured on 2 cores)
TEST_WORKERS ?= 2
# The last part of the built-in sample that `make shards` writes: the sweeps train and evaluate on it.
SAMPLE  := data/sample/eval/coco_test/index.json
# All 10,000 Fashion-MNIST test images, the experiments' classification set.
FASHION_TEST := data/eval/fashion_mnist_test/index.json
ABLATION := yamls/sweeps/flip_ablation.yaml
ABLATION_FLOPS := budget.samples=null budget.flops=6.48e12 folder=runs/sweeps/flip_ablation_flops
DEBIAN_PACKAGES := fonts-noto-color-emoji unicode-data dataset-fashion-mnist
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# img2dataset otherwise checks the internet for an albumentations update.
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install debian-packages shards train demo eval test bench scaling ablate ablate-flops clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e ".[test]"
	touch $@

# The built-in sample's real images ship in Debian packages; Spark needs a Java runtime.
debian-packages:
	@dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(DEBIAN_PACKAGES); }
	@command -v java >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq openjdk-17-jre-headless; }

install: $(STAMP) debian-packages

shards: install
	$(PY) -m data_prep.build $(SOURCES) $(SHARDS_ARGS)

train: install
	$(VENV)/bin/composer -n $(NPROC) pipeline/train.py $(TRAIN) $(ARGS)

# The demo ends by curating the sample with the model it trained: CLIP score, semantic dedup and
# eval-set decontamination (yamls/data/sample_curated.yaml), reusing the sample's downloads.
demo: shards
	$(VENV)/bin/composer -n 1 pipeline/train.py yamls/demo_cpu.yaml $(ARGS)
	$(PY) pipeline/eval.py yamls/eval/zeroshot.yaml load_path=runs/demo
	$(PY) pipeline/export.py yamls/eval/zeroshot.yaml runs/demo/export/tiny-vit-demo load_path=runs/demo
	$(PY) -m data_prep.build yamls/data/sample_curated.yaml

eval: install
	$(PY) pipeline/eval.py $(EVAL) $(ARGS)

# One compute thread a test process: the suite's 2 workers often run 2 ranks each on 2 cores, and
# threads beyond the cores only spin (torchrun likewise sets 1 when a node runs several ranks).
test: export OMP_NUM_THREADS := 1
# The suite's JVMs (Spark drivers, a standalone master, workers and executors) live a minute or
# less: the C1 compiler alone and the serial collector halve their CPU (a sample build's driver,
# 53 -> 28 CPU-s). Long builds (`make shards`) keep the JVM's defaults.
test: export JAVA_TOOL_OPTIONS := -XX:TieredStopAtLevel=1 -XX:+UseSerialGC
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(ARGS)

bench: install $(SAMPLE)
	$(PY) bench/throughput.py $(ARGS)

$(SAMPLE):
	$(MAKE) shards

# A killed sweep, started again, continues the run it was in; finished runs are skipped.
scaling: install $(SAMPLE)
	$(PY) -m pipeline.sweep yamls/sweeps/scaling.yaml $(SWEEP_ARGS)
	$(PY) -m pipeline.sweeps.scaling yamls/sweeps/scaling.yaml
	$(PY) -m pipeline.sweeps.scaling yamls/sweeps/scaling.yaml --max-error 0.5 --out runs/sweeps/scaling/out_of_chance

$(FASHION_TEST): $(SAMPLE)
	$(PY) -m data_prep.build yamls/data/fashion_mnist_test.yaml

ablate: install $(SAMPLE) $(FASHION_TEST)
	$(PY) -m pipeline.sweep $(ABLATION) $(SWEEP_ARGS)
	$(PY) -m pipeline.sweep --report $(ABLATION) $(SWEEP_ARGS)

ablate-flops: install $(SAMPLE) $(FASHION_TEST)
	$(PY) -m pipeline.sweep $(ABLATION) $(ABLATION_FLOPS) $(SWEEP_ARGS)
	$(PY) -m pipeline.sweep --report $(ABLATION) $(ABLATION_FLOPS) $(SWEEP_ARGS)

clean:
	rm -rf data runs
