"""The choices of task options that the command line offers too: one definition for the task
schema (driver/config.py) and `pyhpc run`'s flags, the first of each being its default. Small on
purpose: `pyhpc run` builds its parser from these without loading the schema."""

from __future__ import annotations

WRITABLE = ("tmpfs", "disk", "none")  # the writable layer over the image
NETWORK = ("host", "none")  # the node's network, or loopback only
