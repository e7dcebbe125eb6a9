"""Model families, one file each; every model is a Flax Linen module used through init/apply."""
