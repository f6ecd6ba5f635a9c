"""What a run reads and writes: the checkpoint file format (atomic, verified), images and grids, the loggers,
the pictures of runs and sweeps, the sweep summary, and diffusers' file format (configs and weights).

Imports from ddpm.config only.
"""
