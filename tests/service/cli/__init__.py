"""tests/service/cli."""
