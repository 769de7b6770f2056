"""tests/service/store."""
