"""loraq's development scripts, a package so tests and benches import them by name.

Run them from the repository root as modules, e.g. `.venv/bin/python -m scripts.fetch_smollm2`,
`python -m scripts.make_demo_adapter BASE.gguf OUTDIR`, `python -m scripts.bench`. Tests import
the generators: `from scripts import make_demo_adapter, make_synthetic_model`."""
