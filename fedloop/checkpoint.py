"""Run folders and checkpoints that cannot run code and cannot rot silently.

**Format.** One file, ``checkpoint.safetensors``: the tensors (global factors, head, the
deltas folded into frozen weights) in safetensors, which holds raw numbers and a JSON header
and cannot carry code; everything else (round, simulated time, the allocator's state, the
ledger, the config) as JSON in the header's metadata (``state``); and a SHA-256 of the
content (the state's bytes, then every tensor's name, dtype, shape and raw bytes, in name
order) in the metadata (``sha256``). The file is written to a temporary name and renamed, so
a crash mid-write leaves the previous checkpoint intact.

**Loading** reads the file, parses the header by hand (length, JSON, offsets), recomputes
the digest and compares it before anything is used: a truncated, corrupted (one flipped bit
in any tensor or in the state), foreign or tampered file is refused with one
:class:`CheckpointError` naming the file and the reason, and nothing in the run folder
changes. A pickle checkpoint (``checkpoint.pt``, written by earlier versions) is never
unpickled: it is refused with the reason.

**Run folders** (:class:`RunFolder`): ``out`` must name a directory (not empty, not an
existing file), checked before any training; a lock (an advisory ``flock`` on the folder
that the operating system releases when the process ends, so a crash leaves nothing to
clean up) makes a second run on the same folder stop at once. The lock is taken on the folder
itself, so it adds no file to it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

__all__ = ["CHECKPOINT", "CheckpointError", "CheckpointMissing", "RunFolderBusy", "RunFolder", "save_checkpoint",
           "load_checkpoint", "check_run_folder"]

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"
FORMAT = "tsfa-checkpoint"
VERSION = "1"
#: The tensor dtypes a tsfa checkpoint holds (safetensors names).
DTYPES = ("F32", "F64", "I64")
#: The largest safetensors header we read (bytes); a real one is a few kB.
MAX_HEADER = 64 * 2**20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, foreign, tampered, or pickle)."""


class CheckpointMissing(CheckpointError, FileNotFoundError):
    """No checkpoint to resume from (both a CheckpointError and a FileNotFoundError)."""


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


def _digest(state_text: str, tensors: dict) -> str:
    import torch

    h = hashlib.sha256()
    h.update(state_text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # the raw bytes, whatever the dtype
    return h.hexdigest()


def _state_text(state: dict) -> str:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(state), sort_keys=True, allow_nan=False)


def save_checkpoint(folder, tensors: dict, state: dict) -> Path:
    """Write ``folder/checkpoint.safetensors`` atomically: ``tensors`` {name: tensor} and the
    JSON-able ``state`` (NaN is stored as null), with the SHA-256 of both."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = _state_text(state)
    meta = {"format": FORMAT, "version": VERSION, "state": text, "sha256": _digest(text, tensors)}
    tmp = folder / (CHECKPOINT + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, folder / CHECKPOINT)
    return folder / CHECKPOINT


def load_checkpoint(folder) -> tuple[dict, dict]:
    """``(tensors, state)`` from ``folder/checkpoint.safetensors``, verified (module docstring);
    raises :class:`CheckpointError` naming the file and the reason."""

    folder = Path(folder)
    path = folder / CHECKPOINT
    if not path.is_file():
        if (folder / LEGACY_CHECKPOINT).is_file():
            raise CheckpointError(f"{folder / LEGACY_CHECKPOINT} is a pickle checkpoint of an earlier version; "
                                  "it is not loaded (unpickling can run code): start the run again")
        raise CheckpointMissing(f"cannot resume: no {CHECKPOINT} in {folder}")

    try:
        return _read_verified(path.read_bytes())
    except _Refused as exc:
        raise CheckpointError(f"{path}: {exc}; the checkpoint is not used (nothing in {folder} was changed)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it: {exc.strerror or exc}") from None


class _Refused(Exception):
    pass


def _read_verified(data: bytes) -> tuple[dict, dict]:
    """Parse and verify a checkpoint's bytes; raises _Refused with the reason, and nothing else."""
    import torch
    from safetensors.torch import load as load_tensors

    if len(data) < 8:
        raise _Refused(f"truncated ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER, len(data) - 8):
        raise _Refused("corrupt header length")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _Refused("corrupt header") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _Refused("not a tsfa checkpoint")
    if meta.get("version") != VERSION:
        raise _Refused(f"checkpoint format version {str(meta.get('version'))[:20]!r}, this tsfa reads {VERSION}")
    odd = sorted(k for k, v in header.items() if k != "__metadata__" and (not isinstance(v, dict)
                                                                          or v.get("dtype") not in DTYPES))
    if odd:
        raise _Refused(f"tensors of an unsupported dtype or layout: {odd[:5]} (tsfa writes {sorted(DTYPES)})")
    try:
        tensors = load_tensors(data)
    except Exception as exc:  # safetensors raises its own error type for a malformed file
        raise _Refused(f"corrupt tensor data ({type(exc).__name__}: {str(exc)[:120]})") from None
    text = meta.get("state")
    if not isinstance(text, str) or _digest(text, tensors) != meta.get("sha256"):
        raise _Refused("SHA-256 mismatch: the content changed after it was written")
    try:
        state = json.loads(text)
    except (ValueError, RecursionError):
        raise _Refused("its state is not JSON") from None
    if not isinstance(state, dict):
        raise _Refused("its state is not a JSON object")
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise _Refused(f"non-finite values in {bad[:5]}")
    return tensors, state


def check_run_folder(out) -> Path:
    """``out`` as a Path, if it can be a run folder: a non-empty path that is not a file."""
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise ValueError(f"out must name a run folder; got out = {out!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out must name a folder, but {path} is a file; got out = {str(out)!r}")
    for parent in path.absolute().parents:  # the first existing ancestor must be a folder too
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"out must name a folder, but {parent} is a file; got out = {str(out)!r}")
            break
    return path


class RunFolder:
    """``with RunFolder(out):`` checks ``out``, creates it and holds its lock for the block."""

    def __init__(self, out):
        self.path = check_run_folder(out)
        self._fd: int | None = None

    def __enter__(self) -> RunFolder:
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)  # the folder itself: no lock file to leave behind
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunFolderBusy(f"run folder {self.path} is in use by another run; wait for it to end or "
                                "choose another out") from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
