"""Sample quality and likelihood: the feature networks and the pure metrics over their features (FID, KID,
precision/recall, IS), the npz format of samples and shards, the reference statistics, the protocol recorded
beside every number, the NFE sweep, bits/dim on the test split, and FID during training.
ddpm.tasks.evaluate wires them into task=evaluate.

Imports from ddpm.config, ddpm.runtime, ddpm.io, ddpm.model, ddpm.data and ddpm.diffusion.
"""
