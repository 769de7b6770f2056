"""The MNIST training service: the HTTP API and the domain it shares with the workers."""
