"""Using a trained run: load it, predict, generate text, export, quantize."""
