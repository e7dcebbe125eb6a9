"""Optional features that wrap an experiment when its config turns them on (research/steps.py `with_features`):
each changes what it wraps (the model's dense layers, the loss, the evaluation, the optimizer, the initial
variables), never the core's Setup or train step. Low-rank adapters (lora.py: they change the model, so
prediction has them too), distillation (distill.py), preference optimisation (preference.py: DPO)."""
