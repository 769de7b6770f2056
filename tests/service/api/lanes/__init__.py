"""tests/service/api/lanes."""
