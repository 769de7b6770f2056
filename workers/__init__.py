"""Worker processes: claim queued jobs from the database and train them."""
