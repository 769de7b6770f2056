"""Worker processes: claim queued jobs from the database and train them.

Importing the package turns on MKL's strict reproducible mode (unless ``MKL_CBWR`` is set
already): in it a matrix product gives the same bits at any thread count, so the thread tuner
(:mod:`workers.threads`) may change counts mid-job and a seeded job still repeats its losses.
MKL reads the setting at its first call, so it is set here, before any worker, supervisor,
benchmark or test in the process can have multiplied a matrix.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
