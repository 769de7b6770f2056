"""service/serving."""
