"""How many threads a CPU worker trains with: its own steps timed at each count
(:mod:`workers.tuning.threads`), and what other processes do on its cores
(:mod:`workers.tuning.other_load`)."""
