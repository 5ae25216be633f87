.PHONY: test test-fast quality style bench

test:            ## everything CI runs, integration tests included (2 test processes)
	pytest -n 2 --dist loadgroup

test-fast:       ## unit tests only: tiny random models, no real weights or data
	pytest -m "not integration and not slow"

quality:
	ruff check src tests benchmarks scripts
	ruff format --check src tests benchmarks scripts

style:
	ruff check --fix src tests benchmarks scripts
	ruff format src tests benchmarks scripts

bench:           ## CLINC150 method comparison (about two hours on 2 CPU cores)
	python benchmarks/clinc150_methods.py
