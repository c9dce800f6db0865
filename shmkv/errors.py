"""Layer 0: the exception tree of shmkv.

    ShmkvError
    ├── ConfigError(ValueError)          invalid configuration, CLI option or input file
    │   └── TraceFormatError             a malformed trace line (carries file, line, field)
    ├── SignalError(ValueError)          a malformed block signal; raised before any state change
    ├── CapacityError                    can never fit (segment larger than /dev/shm, ...)
    ├── ResourceError
    │   ├── ClosedError                  the resource was already closed
    │   └── BrokenWorkerError            a peer process died
    ├── SharedMemoryError(OSError)       create / attach / magic / layout mismatch
    ├── ProtocolError(ValueError)        a malformed wire message or frame
    ├── WorkerTimeoutError(TimeoutError) readiness or RPC deadline exceeded
    └── InvariantError(AssertionError)   a bug in shmkv: please file an issue

Expected outcomes (a full pool, a miss) are values, never exceptions.
"""

from __future__ import annotations


class ShmkvError(Exception):
    """Base class of every error shmkv raises on purpose."""


class ConfigError(ShmkvError, ValueError):
    """An invalid option, configuration value or input; the message says what to change."""


class TraceFormatError(ConfigError):
    """A malformed line in a trace file."""

    def __init__(self, path: str, line_no: int, field: str, reason: str) -> None:
        super().__init__(f"{path}:{line_no}: field {field!r}: {reason}")
        self.path = path
        self.line_no = line_no
        self.field = field
        self.reason = reason


class SignalError(ShmkvError, ValueError):
    """A malformed or out-of-state block signal. Raised before any state is changed."""


class CapacityError(ShmkvError):
    """A request that can never fit (not a transiently full pool)."""


class ResourceError(ShmkvError):
    """A problem with an owned resource (segment, socket, process)."""


class ClosedError(ResourceError):
    """The resource has been closed."""


class BrokenWorkerError(ResourceError):
    """A peer process died or stopped answering."""


class SharedMemoryError(ShmkvError, OSError):
    """Creating, sizing or attaching a shared-memory segment failed."""


class ProtocolError(ShmkvError, ValueError):
    """A malformed wire message."""


class WorkerTimeoutError(ShmkvError, TimeoutError):
    """A readiness or request deadline passed."""


class InvariantError(ShmkvError, AssertionError):
    """An internal invariant was violated: a bug in shmkv."""
