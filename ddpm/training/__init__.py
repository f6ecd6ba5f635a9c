"""The training loop and its parts: the settings of the `trainer` group, the optimizer, the update step, the
global-batch noise stream, loop state, the non-finite policy, the checkpointer and resume, stop signals, the
held-out loss and sample grids, and the wiring of those parts (setup.py) around the loop (loop.py).

Imports from ddpm.config, ddpm.runtime, ddpm.io, ddpm.model, ddpm.data and ddpm.diffusion.
"""
