"""aligner-serve: a multi-tenant OpenAI-compatible server for Aligner adapters on vLLM."""
