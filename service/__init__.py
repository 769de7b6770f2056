"""The MNIST training service: the HTTP API and the domain it shares with the workers.

Importing the package turns on MKL's strict reproducible mode (unless ``MKL_CBWR`` is set
already): in it a matrix product gives the same bits at any thread count, so the workers'
thread tuner (:mod:`workers.tuning.threads`) may change counts mid-job and a seeded job still
repeats its losses. MKL reads the setting at its first call, so it is set on import, before any
process of the service (API, worker, CLI, benchmark, test) can have multiplied a matrix;
every process gets the same mode, so no figure depends on which process imported what first.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
