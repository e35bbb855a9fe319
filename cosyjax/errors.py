"""The package's one base error class.

Every error cosyjax raises for bad input or an unusable model folder derives from `CosyJaxError`
(itself a `ValueError`, so `except ValueError` in user code keeps working). The CLI and the server
catch exactly this class: anything else is a bug and surfaces with its traceback.
"""
from __future__ import annotations

__all__ = ["CosyJaxError", "CapabilityError"]


class CosyJaxError(ValueError):
    """Bad input, a bad model folder or checkpoint, or a request the library cannot serve."""


class CapabilityError(CosyJaxError):
    """A requested implementation (kernel, backend, dtype) is not available here; the message says why."""
