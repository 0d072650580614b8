"""Training, data generation and evaluation for Aligner adapters (`aligner train`, `aligner make-data`, `aligner eval`).

Nothing here imports vLLM at module level; `training.data` uses it only when asked to generate with it.
"""
