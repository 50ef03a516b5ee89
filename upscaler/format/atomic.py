"""The one way gguf-upscale puts a small file in place: complete, or not at all.

Every file the tool writes goes through `atomic_write` (imatrix files, model cards, the GGUF
writer's commit journal); the GGUF writer's own data files follow the same policy through its
temporary folder and journal (see writer.py), because they are too large to stream through one
call and are committed as a shard set.

The policy:

- The bytes go to a new temporary file beside the destination (`.NAME.gguf-upscale-tmp.XXXXXXXX`,
  created with O_EXCL and mode 0o666 so the umask decides the permissions, as for any new file),
  then take the destination's name in one step: `os.replace` when replacing is allowed, else a
  hard link, which fails if a file of that name appeared meanwhile (create-if-absent; on a
  filesystem without hard links, checked then renamed). On any error the temporary file is
  removed and the destination is untouched.
- No fsync. A killed process (Ctrl-C, SIGKILL, OOM) never leaves a partial file under the final
  name; a power cut may lose the newest file, exactly as with cp, gguf-split and llama-quantize.
  One rule for every output: fsyncing a 100 GB model would add the whole write-back time to every
  run, and syncing only the small files would make their guarantees differ from the model's.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path

TMP_TAG = ".gguf-upscale-tmp."

Chunk = bytes | bytearray | memoryview


def temp_name(dest: Path) -> Path:
    """A fresh temporary name beside `dest`, recognisably ours."""
    return dest.with_name(f".{dest.name}{TMP_TAG}{secrets.token_hex(4)}")


def atomic_write(dest: str | os.PathLike[str], chunks: Iterable[Chunk] | Chunk, *, replace: bool = True) -> Path:
    """Write `chunks` (or one bytes object) to `dest` atomically; see the module doc for the policy.

    `replace=False` refuses an existing `dest` with FileExistsError, even one that appears while
    writing. Other failures raise OSError; the caller words them for its own kind of file."""
    dest = Path(dest)
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    for _ in range(100):
        tmp = temp_name(dest)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(f"cannot create a temporary file beside {dest}")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        if replace:
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest)  # atomic create-if-absent: a file that appeared meanwhile is kept
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links
                if dest.exists() or dest.is_symlink():
                    raise FileExistsError(f"{dest} exists") from None
                os.replace(tmp, dest)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError:
            pass
    return dest
