"""The exception fastat raises when a backend cannot run (a leaf module: everything may import it)."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this machine or for this call."""
