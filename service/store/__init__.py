"""service/store."""
