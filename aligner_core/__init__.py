"""Aligner core: the adapter format, the served model's identity and the reference forward.

Nothing here imports vLLM or FastAPI; the server, the engine and the training CLI all build on it.
"""
