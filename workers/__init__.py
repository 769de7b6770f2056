"""Worker processes: claim queued jobs from the database and train them.

MKL's strict reproducible mode, which lets the thread tuner change counts mid-job while a
seeded job still repeats its losses, is turned on where every process of the service gets it
(:mod:`service`).
"""

import service  # noqa: F401  (MKL's mode, before any matrix is multiplied)
