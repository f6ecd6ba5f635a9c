"""Entry points selected with `task=NAME`; each takes the composed config and is one wiring function.

The top layer: may import every other subpackage; no task imports from another task.
"""
