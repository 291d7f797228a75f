"""pyhpc: a Nomad task driver that runs HPC jobs as SquashFS containers."""

__version__ = "0.1.0"
