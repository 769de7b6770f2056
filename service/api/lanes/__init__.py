"""service/api/lanes."""
