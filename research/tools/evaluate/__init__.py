"""Downstream evaluation with EleutherAI's lm-evaluation-harness: harness.py (the model backed by a run, the local
and the harness's own tasks), __main__.py (`python -m research.tools.evaluate`). Nothing is imported here, so the
command configures the process before JAX and the harness load."""
