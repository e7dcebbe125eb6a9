"""Optional features that wrap an experiment when its config turns them on (research/steps.py `with_features`):
each changes what it wraps (the loss, the evaluation, the initial variables), never the core's Setup or train
step. Distillation (distill.py); post-training's adapters and preference losses belong here too."""
