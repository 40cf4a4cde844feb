"""Turning network outputs (or raw images, for the classical baseline) into instance labels.

``policy`` decodes a network output (grid, affinities, size), ``mws`` holds the mutex-watershed
rules, ``classical`` the Otsu + watershed baseline, ``volume_baselines`` the 3D baselines (3D Otsu +
watershed, seeded watershed on EM boundaries, linking per-plane labels across z).
"""
