"""The command line (``mnist-service``): its commands, its HTTP client, the epoch bars."""
