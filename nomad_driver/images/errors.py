"""The images layer's errors, apart from the store itself: a start from a file names them
without loading the store."""

from __future__ import annotations

from nomad_driver.util.errors import PyhpcError


class StoreError(PyhpcError, RuntimeError):
    """An import or store operation failed; nothing half-written was left behind."""
