"""One door to TensorRT: the `tensorrt` or the `tensorrt_rtx` module, chosen by backend name.

Both libraries expose the same builder / network / OnnxParser / runtime API, so the rest of
llmc takes the module returned by `import_trt(backend)` and never imports either by name.
Nothing is imported when llmc itself is imported: TensorRT is loaded on first use.
"""

from __future__ import annotations

import importlib
import re
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Callable, Iterator

from llmc.errors import LlmcError

# backend name -> (module name, pip extra that installs it)
_BACKENDS: dict[str, tuple[str, str]] = {
    "tensorrt": ("tensorrt", "trt"),
    "tensorrt-rtx": ("tensorrt_rtx", "rtx"),
}
TRT_BACKENDS = tuple(_BACKENDS)


class TensorRTMissingError(LlmcError, ImportError):
    """The library a backend needs is not installed (or its native libraries do not load)."""


def check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(
            f"unknown TensorRT backend {backend!r}; choose one of {', '.join(TRT_BACKENDS)}"
        )


def module_name(backend: str) -> str:
    check_backend(backend)
    return _BACKENDS[backend][0]


def import_trt(backend: str) -> ModuleType:
    """The TensorRT module for `backend`, or a TensorRTMissingError naming the pip extra."""
    check_backend(backend)
    name, extra = _BACKENDS[backend]
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise TensorRTMissingError(
            f"the {backend} backend needs the Python module `{name}`, which could not be "
            f"imported ({exc}); install it with: pip install 'llmc[{extra}]'"
        ) from exc


def is_importable(backend: str) -> tuple[bool, str]:
    """(True, "") when the backend's module imports, else (False, the reason as a sentence)."""
    try:
        import_trt(backend)
    except TensorRTMissingError as exc:
        return False, str(exc)
    return True, ""


def library_version(trt: ModuleType) -> str:
    """The library's full version string, e.g. '1.7.1.116' for tensorrt_rtx."""
    return str(getattr(trt, "__version__", "unknown"))


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.15.1.29' -> (10, 15, 1, 29); a suffix such as 'rc1' or '+cu13' is dropped."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def parser_version(trt: ModuleType) -> str:
    """The ONNX parser's version, where the library reports it (an int like 200)."""
    getter = getattr(trt, "get_nv_onnx_parser_version", None)
    return str(getter()) if getter else "unknown"


def versions(backend: str) -> dict[str, str]:
    """Versions to record in an engine header: backend name, module, library, ONNX parser."""
    trt = import_trt(backend)
    return {
        "backend": backend,
        "module": module_name(backend),
        "library_version": library_version(trt),
        "onnx_parser_version": parser_version(trt),
    }


# TensorRT keeps the first logger a process hands to a builder, runtime or refitter and
# ignores later ones (with a warning). So llmc makes one logger per library, lazily, and
# points its sink at the current caller's `log` for the duration of a call.
_LOGGERS: dict[str, Any] = {}


def get_logger(trt: ModuleType):
    """The process-wide ILogger llmc gives to `trt` (made on first use)."""
    name = module_name_of(trt)
    if name not in _LOGGERS:
        _LOGGERS[name] = _make_logger(trt)
    return _LOGGERS[name]


@contextmanager
def capture_log(logger, log: Callable[[str], None], verbose: bool = False) -> Iterator[list]:
    """Send `logger`'s messages to `log` inside the block; yields the errors seen there."""
    saved = (logger.sink, logger.verbose, logger.errors)
    logger.sink, logger.verbose, logger.errors = log, verbose, []
    try:
        yield logger.errors
    finally:
        logger.sink, logger.verbose, logger.errors = saved


def _make_logger(trt: ModuleType):
    severity = trt.ILogger.Severity
    prefix = module_name_of(trt)

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.sink: Callable[[str], None] = print
            self.verbose = False
            self.errors: list[str] = []

        def log(self, sev, msg):  # noqa: A003 - TensorRT's method name
            # Severities order from INTERNAL_ERROR (0) to VERBOSE (4).
            if int(sev) <= int(severity.ERROR):
                self.errors.append(msg)
            limit = severity.INFO if self.verbose else severity.WARNING
            if int(sev) <= int(limit):
                self.sink(f"[{prefix} {sev.name}] {msg}")

    return _Logger()


def module_name_of(trt: ModuleType) -> str:
    return trt.__name__.split(".")[0]
