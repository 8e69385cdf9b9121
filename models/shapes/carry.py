"""Carry a training run directory across machines that keep nothing but the git repository.

A from-seed run of the shapes recipe takes longer than one working session on a 2-core CPU, and the run
directory (``runs/``, git-ignored) does not outlive the session. ``pack`` copies what a run needs to resume
into a directory that can be committed: every checkpoint (weights, optimizer state, random streams) and the
tokenizer, with files larger than ``PART_BYTES`` split into parts (no tracked file over 30 MB), and a manifest
with each file's size and SHA-256. ``unpack`` reassembles it into a run directory, checking every file, so
that ``diffuserve train shapes --run-dir DIR`` resumes exactly where the packed run stopped.

Left out are caches a stage rebuilds from the checkpoints it resumes from (the base stage's encoded latents,
~250 MB, are encoded again from the decoder stage's VAE in a few minutes) and half-written checkpoints.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
from pathlib import Path, PurePosixPath

PART_BYTES = 24 * 2**20
MANIFEST = "carry.json"
# Rebuilt on resume: encoded latents (the decoder's VAE encodes them again), a checkpoint being written.
SKIP = ("*latents*.safetensors", "*.tmp/*", "*.log")


class CarryError(ValueError):
    pass


def _skipped(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pattern) for pattern in SKIP)


def _safe_relpath(rel: str) -> str:
    """A manifest's file name, refused if it could write outside the run directory (the manifest is data
    read from the repository, so it is checked as any other input)."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise CarryError(f"carry manifest names a path outside the run directory: {rel!r}")
    return rel


def pack(run_dir: Path, dest: Path, part_bytes: int = PART_BYTES) -> dict:
    """Copy ``run_dir`` (less ``SKIP``) into ``dest``, replacing what an earlier pack put there; returns the
    manifest. ``dest`` must be empty or hold an earlier pack (never an unrelated directory to clear)."""
    run_dir, dest = Path(run_dir), Path(dest)
    if not (run_dir / "config.json").is_file():
        raise CarryError(f"{run_dir} is not a training run directory (no config.json)")
    if dest.exists() and any(dest.iterdir()) and not (dest / MANIFEST).is_file():
        raise CarryError(f"{dest} is not empty and holds no {MANIFEST}: refusing to replace it")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    files: dict[str, dict] = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(run_dir).as_posix()
        if _skipped(rel):
            continue
        files[rel] = _split(path, dest / rel, part_bytes)
    manifest = {"files": files, "steps": _steps(run_dir)}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _part(path: Path, i: int) -> Path:
    return Path(f"{path}.part-{i:03d}")


def _split(path: Path, target: Path, part_bytes: int) -> dict:
    """Copy ``path`` to ``target`` (or, if larger than ``part_bytes``, to ``target.part-000``, ...), hashing it
    in the same read; returns its manifest entry."""
    size = path.stat().st_size
    parts = max(1, -(-size // part_bytes))
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for i in range(parts):
            chunk = f.read(part_bytes)
            h.update(chunk)
            (target if parts == 1 else _part(target, i)).write_bytes(chunk)
    return {"bytes": size, "sha256": h.hexdigest(), "parts": parts}


def _steps(run_dir: Path) -> dict[str, int]:
    """Each checkpointed stage's step, for the manifest's reader."""
    steps = {}
    for state in sorted(run_dir.glob("*/state.json")):
        steps[state.parent.name] = json.loads(state.read_text())["step"]
    return steps


def unpack(src: Path, run_dir: Path, force: bool = False) -> dict:
    """Rebuild the run directory packed in ``src`` at ``run_dir``, checking every file's size and SHA-256
    before anything is moved into place. A non-empty ``run_dir`` is kept unless ``force`` (its checkpoints
    may be further on than the packed ones)."""
    src, run_dir = Path(src), Path(run_dir)
    if not (src / MANIFEST).is_file():
        raise CarryError(f"{src} holds no {MANIFEST}: not a packed run")
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise CarryError(f"{run_dir} is not empty: refusing to overwrite it (force to replace it)")
    manifest = json.loads((src / MANIFEST).read_text())
    tmp = run_dir.with_name(run_dir.name + ".unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, meta in manifest["files"].items():
            _rebuild(src, rel, meta, tmp / _safe_relpath(rel))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(run_dir)
    return manifest


def _rebuild(src: Path, rel: str, meta: dict, target: Path) -> None:
    """Join one packed file's parts at ``target`` and check it against the manifest."""
    target.parent.mkdir(parents=True, exist_ok=True)
    parts = meta["parts"]
    pieces = [src / rel] if parts == 1 else [_part(src / rel, i) for i in range(parts)]
    h, size = hashlib.sha256(), 0
    with target.open("wb") as out:
        for piece in pieces:
            if not piece.is_file():
                raise CarryError(f"packed run is missing {piece}")
            with piece.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                    size += out.write(block)
    if size != meta["bytes"] or h.hexdigest() != meta["sha256"]:
        raise CarryError(f"{rel} does not match its size or SHA-256 in the manifest")
