"""Checkpoints and training states: ``backends`` (where they live, ``MNIST_ARTIFACTS``; what
every path asks) and ``repo`` (the SQL of the ``artifacts`` table). Nothing is imported here,
so the SQL loads without torch."""
