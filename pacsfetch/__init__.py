"""pacsfetch: plugin-based, message-queue DICOM retrieval workers.

Third-party plugins mark their hook implementations with :data:`hookimpl`::

    from pacsfetch import hookimpl

    @hookimpl
    def pacsfetch_transports():
        return [MyTransport()]

and register the module under the ``pacsfetch`` entry-point group of their own package.
"""

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "pacsfetch"

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marker for hook implementations in plugins (``@hookimpl``)."""

__all__ = ["PROJECT_NAME", "__version__", "hookimpl"]
