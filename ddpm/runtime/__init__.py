"""Where and how a process computes: devices and kernel settings, precision and the other fast paths, its share
of the CPUs, data-parallel ranks, random-number state, the run directory it owns, the checks of disks made
before a run, and throughput measurements.

Imports from ddpm.config only.
"""
