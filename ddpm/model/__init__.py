"""The network: the DDPM UNet and its blocks, and the exponential moving average of its weights. The network
maps (x_t, t, y) to a tensor of x_t's shape and knows nothing about noise schedules.

Imports from ddpm.config only.
"""
