"""Tools around training: sweeps, reports, reproductions, the dry run, the optimizer kit and benchmark."""
