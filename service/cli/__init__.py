"""The command line (``mnist-service``): its commands, its HTTP client, its event-stream reader."""
