"""Entry points selected with `task=NAME`; each takes the composed config and is one wiring function."""
