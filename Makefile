PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1 install from local wheels where available (see README)
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test bench clean

$(BIN)/thermo-ebm: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) || $(BIN)/pip install -q "torch>=2.1,<2.15" "torchvision>=0.16,<0.30"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/thermo-ebm

venv: $(BIN)/thermo-ebm

test: venv
	$(BIN)/python -m pytest -q -n auto --durations=15

demo: venv
	$(BIN)/thermo-ebm train --name demo --objective j_ebm --dataset digits --overwrite
	$(BIN)/thermo-ebm measure --ckpt checkpoints/demo.pt --temps 0.5:2:0.1 --out results/demo.h5
	$(BIN)/thermo-ebm eval --ckpt checkpoints/demo.pt --out results/demo.h5
	$(BIN)/thermo-ebm plot results/demo.h5
	$(BIN)/thermo-ebm show results/demo.h5

bench: venv
	$(BIN)/python benchmarks/measure_accuracy.py
	$(BIN)/python benchmarks/train_mnist.py

clean:
	rm -rf $(VENV) .pytest_cache
