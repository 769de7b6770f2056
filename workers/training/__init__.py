"""The tutorial's loop: one job (:mod:`.train`), its CUDA-graph step (:mod:`.graphs`), and
many compatible jobs stacked into one model step (:mod:`.packing`)."""
