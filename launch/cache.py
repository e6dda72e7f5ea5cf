"""The embedded models' on-disk cache (`launch/embedded_model.py`, `launch/rehearsal_model.py`).

Guarantees:
- A model's directory is named by a key of every setting that shapes it: change one and the
  next run builds a new model instead of reusing a stale one.
- A directory is written atomically: built under a temporary name private to this process,
  then renamed into place, so a half-built directory is never reused, and of two processes
  building the same key at once the first rename wins and the other's copy is discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (model, tokenizer, what to record in build.json) of a finished build
Built = tuple[Any, Any, dict[str, Any]]


def cache_key(*settings: Any) -> str:
    """12 hex digits of a hash of `settings` (JSON-serialisable values)."""
    blob = json.dumps(list(settings), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_model(out: Path, build: Callable[[], Built]) -> Path:
    """`out`, holding the model `build()` returns (saved with its tokenizer and build.json)
    unless it is cached there already."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process with our pid
    tmp.mkdir(parents=True)
    model, tokenizer, record = build()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "build.json").write_text(json.dumps(record))
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
