"""Store tests shared by every backend (contract) plus PostgreSQL-specific ones."""
