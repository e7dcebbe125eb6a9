"""Run survival: optional features a run turns on, which the training loop (research/train.py) calls and which
never call it: rolling back past NaNs and loss spikes (rollback), a second checkpoint tier on local disk (tiers),
preemption signals (preemption) and SLURM's requeue (slurm), a lost process in a multi-process run (watchdog),
a failed write as one line (storage)."""
