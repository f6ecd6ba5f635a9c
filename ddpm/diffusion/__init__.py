"""The diffusion process around the network: noise schedules, the Gaussian diffusion (schedule buffers, noising,
the training loss), prediction targets and loss weightings, the terms of the variational bound, the samplers,
drawing N images, and building all of it from a config or a checkpoint.

Imports from ddpm.config, ddpm.runtime, ddpm.io and ddpm.model.
"""
