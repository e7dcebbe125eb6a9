"""Tools around training: sweeps, reports, reproductions, the dry run and planner, the optimizer kit and benchmark,
the Hugging Face converter (hf/), downstream evaluation with the lm-evaluation-harness (evaluate/)."""
