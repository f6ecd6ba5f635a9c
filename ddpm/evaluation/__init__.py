"""Sample quality: the npz format of samples and shards, the reference statistics, the metrics of a set of
images, the NFE sweep, and FID during training. ddpm.tasks.evaluate wires them into task=evaluate."""
