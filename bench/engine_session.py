"""What the runtime benchmarks share: an engine file argument and the session that runs it
(a cuda engine with the share of GPU memory it may fill)."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmc.engine_file import EngineFile
from llmc.runtime.runner import open_session


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser (described by doc's first paragraph) that takes the engine file
    and --gpu-memory-utilization."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    return ap


def open_engine(args: argparse.Namespace):
    """(EngineFile, Session) of the parsed arguments."""
    file = EngineFile(args.engine)
    options = ({"gpu_memory_utilization": args.gpu_memory_utilization}
               if file.header.backend == "cuda" else {})
    return file, open_session(file, **options)
