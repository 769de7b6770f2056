"""The queue's packed claim: more jobs for a worker that trains several in one step (issue #17).

A package of its own because ``service/store`` holds as many modules as a folder may.
"""

from service.store.packs.repo import claim_more

__all__ = ["claim_more"]
