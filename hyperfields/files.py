"""Output files and folders that are either complete or absent: written beside the target, then renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from hyperfields.errors import UserError


def file_mode() -> int:
    """The permission bits of an ordinary new file of this user: 0o666 less the process umask."""
    # /proc reads the umask without changing it; os.umask can only read it by setting it, racing other threads.
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_file(path: Path, write: Callable[[Path], None]) -> Path:
    """`path`, after `write(temporary)` filled a temporary sibling that is then renamed over it with `file_mode()`.

    On any failure the temporary file is removed, `path` keeps its old content (or stays absent) and the error
    propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        # mkstemp and safetensors make owner-only files; an output is shared like any other file of the user's.
        temporary.chmod(file_mode())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """`path`, written as `write_file` writes it; an OSError becomes a UserError naming `path`."""
    try:
        return write_file(path, write)
    except OSError as error:
        raise UserError(f"cannot write '{path}' ({error.strerror or error})") from None


def write_text(path: Path, text: str) -> Path:
    """`path`, holding `text` in UTF-8, written as `write_file` writes it."""
    return write_file(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """`path`, holding `tensors` (and `metadata` in its header) in safetensors, written as `write_file` writes it."""
    return write_file(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def replace_folder(staging: Path, final: Path) -> Path:
    """`final`, now the complete folder `staging`; an existing `final` is moved aside first and removed only after.

    Two renames, so a kill at any moment leaves either folder complete under some name, never a half-deleted one.
    """
    staging, final = Path(staging), Path(final)
    mode = file_mode()
    for path in staging.rglob("*"):  # files written by other libraries (accelerate, diffusers) may be owner-only
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)
    if final.exists():
        replaced = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
        os.replace(staging, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(staging, final)
    return final


def write_folder(final: Path, write: Callable[[Path], None], keep_existing: bool = False) -> Path:
    """`final`, after `write(staging)` filled a new hidden sibling folder that then replaces it (replace_folder).

    On any failure the staging folder is removed and `final` keeps its old content (or stays absent); an OSError
    becomes a UserError naming `final`. With `keep_existing`, a `final` that another process wrote meanwhile is kept.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        staging.chmod(0o755)  # mkdtemp makes it owner-only, and it becomes the final, shareable folder
    except OSError as error:
        raise UserError(f"cannot write '{final}' ({error.strerror or error})") from None
    try:
        write(staging)
        if keep_existing and final.exists():
            shutil.rmtree(staging, ignore_errors=True)
            return final
        return replace_folder(staging, final)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write '{final}' ({error.strerror or error})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def cache_root() -> Path:
    """The folder hyperfields caches into: $HYPERFIELDS_CACHE, else ~/.cache/hyperfields."""
    return Path(os.environ.get("HYPERFIELDS_CACHE") or Path.home() / ".cache" / "hyperfields").expanduser()


def writable_folder(folder: Path) -> Path:
    """`folder`, created if absent and checked to accept new files, so a long run does not fail only at its end."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(f"output folder '{folder}' cannot be written ({error.strerror or error})") from None
    return folder
