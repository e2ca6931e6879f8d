# make setup  - create .venv with everything installed
# make test   - lint, then the test suite (what CI runs)
# make run    - execute the five notebooks in order, headless (DATA=... EPOCHS=... to change)
# make docs   - executed copies of the notebooks in docs/, from one real run (DATA=... too)
# make lab    - JupyterLab on the notebooks
# make tensorboard - the training curves in logs/

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= cifar10
EPOCHS ?= 10
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))

.PHONY: setup test lint run docs lab tensorboard clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

# Any other notebook parameter given on the command line is passed on too, e.g.
#   make run RECIPE=tutorial SMALL_INPUT=False RUN_NAME=tutorial   (the blog's recipe)
#   make run DATA=data/cifar10-jpeg EPOCHS=2 RUN_NAME=quick
# The data is checked first: without a network, or with a misnamed folder, one line says
# what is wrong and what to do, before any notebook starts.
run: setup
	@$(BIN)/python -c 'import sys, images; sys.exit(images.data_source_problem(sys.argv[1]))' "$(DATA)"
	mkdir -p runs
	@for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; \
		$(BIN)/papermill --cwd notebooks --log-output $$nb runs/$$(basename $$nb) \
			-p DATA "$(DATA)" -p EPOCHS $(EPOCHS) \
			$(foreach v,RECIPE SMALL_INPUT BATCH_SIZE LR WEIGHT_DECAY LABEL_SMOOTHING AUGMENT VAL_SIZE DEVICE \
				RUN_NAME SEED RESUME IMAGE IMAGE_URL FOLDER TOPK,$(if $(filter command line,$(origin $(v))),-p $(v) "$($(v))")) \
			|| exit 1; \
	done

# Notebook 3 trains for 10 epochs (see docs/build.py); 4 and 5 use the shipped weights.
docs: setup
	$(BIN)/python docs/build.py --data "$(DATA)"

lab: setup
	$(BIN)/jupyter lab notebooks

tensorboard: setup
	$(BIN)/tensorboard --logdir logs

clean:
	rm -rf runs .pytest_cache .ruff_cache
