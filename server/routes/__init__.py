"""HTTP routes: OpenAI generation and models, adapter management, health and metrics."""
