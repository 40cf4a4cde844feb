"""Turning network outputs (or raw images, for the classical baseline) into instance labels."""
