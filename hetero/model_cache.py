"""The converted-model cache: GGUF files converted once into HF-style directories.

``cached_gguf_dir`` returns a GGUF file's entry, converting the file into it first (with the
converter it is given, ``hetero.loader.convert_gguf``) when the entry is absent or damaged.
The cache (``$HETERO_CACHE_DIR/gguf``, default ``~/.cache/hetero/gguf``) holds::

    <stem>-<fingerprint>-v<N>/            an entry: the HF files and hetero_entry.json, its
                                          manifest (sizes and checksums, the source's identity)
    .tmp~<host>~<pid>~<token>~<entry>/    a conversion in progress (or a damaged entry moved
                                          aside): removed by any load once its owner is gone

A conversion writes a temporary directory and renames it into place, so an entry is complete
or absent; a load that finds a complete entry writes nothing, so a read-only cache works.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

# Bump when the conversion (``hetero.loader.convert_gguf``) or the entry's layout changes what
# an entry holds: older entries are then removed.
# 2: the manifest inside the entry replaced v1's hash stamps beside it.
CONVERTER_VERSION = 2
_MANIFEST = "hetero_entry.json"
_TEMP_PREFIX = ".tmp~"
_SAMPLE_BYTES = 1 << 20  # hashed at each end of a file for its fingerprint
_FOREIGN_TEMP_AGE_S = 24 * 3600  # another host's temporaries: its PIDs cannot be checked here


def cached_gguf_dir(gguf_path: Path, convert: Callable[[Path, Path], None]) -> Path:
    """The cache entry for ``gguf_path``, converting the file first if it is absent or damaged.

    ``convert(gguf_path, out_dir)`` writes the HF files into ``out_dir``, a temporary directory
    that becomes the entry. Raises ``OSError`` saying which cache failed and how to use another
    (``HETERO_CACHE_DIR``) when the entry cannot be written; ``convert``'s errors pass through.
    """
    root = _cache_root()
    st = gguf_path.stat()
    key = f"{gguf_path.stem}-{_sample_digest(gguf_path, st.st_size)[:16]}-v{CONVERTER_VERSION}"
    entry = root / key
    _remove_leftovers(root)
    exists = entry.is_dir()
    damage = _entry_damage(entry, gguf_path, st) if exists else None
    if exists and damage is None:
        return entry  # a hit: nothing is written
    if damage:
        logger.warning("%s: %s; converting %s into it again", entry, damage, gguf_path)
    else:
        logger.info("converting %s to %s, once", gguf_path, entry)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = _owned_temp_path(root, key)
        tmp.mkdir()
    except OSError as e:
        raise _cache_error(e, entry, damage) from None
    try:
        convert(gguf_path, tmp)
        _write_manifest(tmp, gguf_path, st)
        _publish(tmp, entry, lambda: _entry_damage(entry, gguf_path, st) is None)
    except OSError as e:
        raise _cache_error(e, entry, damage) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _cache_error(e: OSError, entry: Path, damage: str | None) -> OSError:
    """``e`` as a one-line error that says which cache failed and how to use another one."""
    if damage:
        what = f"the cache entry {entry} is damaged ({damage}) and cannot be rebuilt"
        fix = f"delete {entry} (rm -r) or set HETERO_CACHE_DIR to another directory"
    else:
        what = f"cannot write the converted model into the cache {entry.parent}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space there, or set HETERO_CACHE_DIR to a directory with room"
        else:
            fix = "set HETERO_CACHE_DIR to a writable directory"
    message = f"{what}: {e.strerror or e}; {fix} (e.g. HETERO_CACHE_DIR=/tmp/hetero-cache)"
    return OSError(e.errno, message) if e.errno else OSError(message)


def _write_manifest(entry_dir: Path, gguf_path: Path, st: os.stat_result) -> None:
    """Record, inside the entry, what a load checks: each file's size and sampled checksum,
    and the source's identity. Written last, once: a load never writes to the cache."""
    files = {}
    for p in sorted(entry_dir.iterdir()):
        size = p.stat().st_size
        files[p.name] = {"size": size, "sample_sha256": _sample_digest(p, size)}
    source = {
        "path": str(gguf_path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": _file_sha256(gguf_path),
    }
    manifest = {"converter_version": CONVERTER_VERSION, "source": source, "files": files}
    with open(entry_dir / _MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)


def _entry_damage(entry: Path, gguf_path: Path, st: os.stat_result) -> str | None:
    """What is wrong with the existing ``entry`` as a conversion of ``gguf_path``, or None."""
    try:
        with open(entry / _MANIFEST, encoding="utf-8") as f:
            manifest = json.load(f)
        version, source = manifest["converter_version"], manifest["source"]
        files = {n: (int(w["size"]), w["sample_sha256"]) for n, w in manifest["files"].items()}
        size, mtime_ns, sha256 = (source[k] for k in ("size", "mtime_ns", "sha256"))
    except FileNotFoundError:
        return f"it has no {_MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"its {_MANIFEST} is unreadable ({type(e).__name__}: {_short(e)})"
    if version != CONVERTER_VERSION or not {"config.json", "model.safetensors"} <= set(files):
        return f"its {_MANIFEST} does not describe a converter v{CONVERTER_VERSION} entry"
    for name, (want_size, want_digest) in files.items():
        try:
            got = (entry / name).stat().st_size
            if got != want_size:
                return f"{name} has {got} bytes, not {want_size}"
            if _sample_digest(entry / name, got) != want_digest:
                return f"{name} does not match its checksum"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} is unreadable ({e.strerror})"
    if (size, mtime_ns) != (st.st_size, st.st_mtime_ns):
        # a copy, or a touched file, with the same fingerprint: its content decides
        logger.info("%s: not the file %s was converted from; comparing sha256", gguf_path, entry)
        if _file_sha256(gguf_path) != sha256:
            return f"it was converted from {source.get('path')}, a different file"
    return None


def _publish(tmp: Path, entry: Path, entry_is_good: Callable[[], bool]) -> None:
    """Rename the finished ``tmp`` to ``entry`` (atomic), moving a damaged ``entry`` aside."""
    for _ in range(3):
        try:
            os.rename(tmp, entry)  # fails while entry exists and is not empty
            return
        except OSError:
            if not entry.exists():
                raise
        if entry_is_good():  # another process published first; its entry is as good as ours
            return
        aside = _owned_temp_path(entry.parent, entry.name)  # swept if we die holding it
        try:
            os.rename(entry, aside)
        except FileNotFoundError:  # another process moved it aside
            continue
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(errno.EBUSY, f"{entry}: other processes keep replacing this cache entry")


def _owned_temp_path(root: Path, key: str) -> Path:
    host = socket.gethostname().replace("~", "-")
    return root / f"{_TEMP_PREFIX}{host}~{os.getpid()}~{secrets.token_hex(4)}~{key}"


def _remove_leftovers(root: Path) -> None:
    """Remove dead conversions' temporaries and older converters' files (best effort: a
    read-only cache keeps them, and a cache without any writes nothing)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        path = root / name
        if path.is_dir() and not path.is_symlink() and _is_leftover(path):
            logger.info("removing %s, left by an interrupted or older conversion", path)
            shutil.rmtree(path, ignore_errors=True)


def _is_leftover(path: Path) -> bool:
    name = path.name
    if name.startswith(_TEMP_PREFIX):
        parts = name.split("~", 4)
        if len(parts) != 5 or not parts[2].isdigit() or int(parts[2]) <= 0:
            return False  # not one of ours
        if parts[1] == socket.gethostname().replace("~", "-"):
            return not _pid_alive(int(parts[2]))
        try:
            return time.time() - path.stat().st_mtime > _FOREIGN_TEMP_AGE_S
        except OSError:
            return False
    if name == "stamps":  # converter v1's sha256 memo
        return True
    # an entry, or a v1 temporary (mkdtemp's ".<entry>.XXXXXXXX"), of an older converter
    match = re.fullmatch(r"\.?.+-[0-9a-f]{16}-v(\d+)(\.\w{8})?", name)
    return match is not None and int(match[1]) < CONVERTER_VERSION


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _cache_root() -> Path:
    root = os.environ.get("HETERO_CACHE_DIR")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        root = os.path.join(xdg, "hetero")
    return Path(root) / "gguf"


def _sample_digest(path: Path, size: int) -> str:
    """sha256 of the size and the first and last MiB: catches truncation and rewrites cheaply."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE_BYTES))
        if size > _SAMPLE_BYTES:
            f.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _short(e: BaseException) -> str:
    """One line of an exception from a parser (tokenizers' and numpy's can run long)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."
