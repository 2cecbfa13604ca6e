"""Safe file io: every file tunesmith writes is written atomically, every weights file it reads is read strictly.

Writing. A kill, a full disk or a crash in the middle of a write must never leave a half-written
file under the real name, where the next run would trust it. So every write goes to a temporary
name in the same folder (`.<name>.tmp-<pid>`, same filesystem, so the rename is atomic), is
flushed and fsynced, and only then renamed over the real name; the folder is fsynced so the
rename itself survives a power cut. On any failure the temporary file is removed and the old
file, if there was one, is left exactly as it was.

    atomic_write(path, write)          write(tmp_path) writes the bytes; the rest is done here
    atomic_write_bytes / _text / _json
    atomic_save_safetensors(tensors, path, metadata)
    atomic_torch_save(obj, path)       tensors and plain containers only (checkpoints' optimizer.pt, rng.pt)

Reading. A missing, truncated or corrupt file, or one that does not hold what the model expects,
is the user's to fix (a wrong folder, a file from another model, a copy cut short), so it is one
`UserError` naming the file and what it should hold, never a traceback from deep inside
safetensors, peft or torch.

    read_safetensors(path, what)       the tensors, or a UserError
    check_safetensors(path, what)      the header only (cheap: nothing is read into memory)
    read_torch(path, what)             torch.load(weights_only=True): runs no pickled code
    read_json(path, what)
    read_yaml(path)                    a config file: a mapping, or a UserError with the line
    check_keys(expected, tensors, path, ...)      missing, unexpected and mis-shaped tensors, a few of each
    load_state_strict(target, tensors, path, ...) check_keys, then copy into the module's tensors

Directory-level atomicity (a checkpoint folder, a converted model, a data cache entry: temporary
folder, marker, rename) stays with the code that owns those folders; the files inside them are
written with the functions here.

torch and safetensors are imported inside the functions that need them: config.py and the command
modules import this one, and `tunesmith --help` must not pay for torch.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

SHOWN = 3  # names listed per kind of mismatch: enough to recognise the problem, short enough to read
MAX_REASON = 200  # characters of a library's own error message quoted in ours


# ---------------------------------------------------------------------------------------------
# Writing


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a folder's entries are data of the folder)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) for a temporary path beside `path`, fsync it, rename it over `path`, fsync the folder.

    Any exception (OSError from a full disk, a serializer's error, a KeyboardInterrupt) removes the
    temporary file and propagates; `path` keeps its old content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    """JSON (with a final newline); values json cannot encode (sets, paths, dtypes) are written as str."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """Save tensors (detached, contiguous, on the CPU) as a safetensors file. The metadata defaults to
    {"format": "pt"}, which transformers and peft expect."""
    from safetensors.torch import save_file

    data = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, tmp, metadata=metadata or {"format": "pt"}))


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save, atomically: for state that is not a flat dict of tensors (optimizer moments, RNG states)."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ---------------------------------------------------------------------------------------------
# Reading


def _reason(e: Exception) -> str:
    return (str(e) or type(e).__name__)[:MAX_REASON]


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise UserError(f"{str(path)!r} does not exist; it should hold {what}.")


def _unreadable(path: Path, what: str, e: Exception) -> UserError:
    return UserError(f"{str(path)!r} is corrupt or not a safetensors file ({_reason(e)}); it should hold {what}. "
                     "Was it cut short by a full disk or an interrupted copy?")


def read_safetensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or corrupt file is a UserError.

    `what` says what the file should hold, for the message ("the LoRA adapter's weights")."""
    from safetensors.torch import load_file

    path = Path(path)
    _require_file(path, what)
    try:
        return load_file(path)
    except Exception as e:  # corrupt bytes surface as several exception types (SafetensorError, OSError, ...)
        raise _unreadable(path, what, e) from None


def check_safetensors(path: str | Path, what: str) -> None:
    """Validate a safetensors file's header without reading its tensors: safetensors checks that the
    header parses and that its offsets cover the file exactly, so a truncated file fails here."""
    from safetensors import safe_open

    path = Path(path)
    _require_file(path, what)
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as e:
        raise _unreadable(path, what, e) from None


def read_torch(path: str | Path, what: str):
    """torch.load with weights_only=True (tensors and plain containers; no pickled code runs)."""
    import torch

    path = Path(path)
    _require_file(path, what)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # a corrupt file, or one that references code (refused by weights_only)
        raise UserError(f"{str(path)!r} is corrupt or holds more than tensors ({_reason(e)}); "
                        f"it should hold {what}.") from None


def read_json(path: str | Path, what: str):
    path = Path(path)
    _require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{str(path)!r} is not valid JSON ({_reason(e)}); it should hold {what}.") from None


def _few(names: list[str]) -> str:
    shown = ", ".join(repr(n[:MAX_REASON]) for n in names[:SHOWN])
    return shown + (f", and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def check_keys(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], path: str | Path,
               required: Collection[str] | None = None, what: str = "this model") -> None:
    """Raise one UserError if `tensors` (read from `path`) does not fit `expected` (name -> tensor it
    goes into): keys missing from the file (of `required`, by default all of `expected`), keys the model
    does not have, and tensors whose shape differs, a few of each, with their counts."""
    required = expected.keys() if required is None else required
    missing = sorted(set(required) - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    wrong = sorted(k for k in tensors.keys() & expected.keys() if tuple(tensors[k].shape) != tuple(expected[k].shape))
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if wrong:
        shapes = [f"{k} has shape {tuple(tensors[k].shape)}, expected {tuple(expected[k].shape)}" for k in wrong]
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {_few(shapes)}")
    raise UserError(f"{str(path)!r} does not fit {what}: {'; '.join(problems)}. "
                    "Was it saved for a different model, method or config?")


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` under each of its names (a tied weight under all of them)."""
    return {**dict(module.named_buffers(remove_duplicate=False)),
            **dict(module.named_parameters(remove_duplicate=False))}


def load_state_strict(target: nn.Module | Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
                      path: str | Path, required: Collection[str] | None = None, what: str = "this model") -> None:
    """check_keys, then copy each tensor into its target (cast to the target's dtype).

    `target`: a module (its parameters and buffers by name, see module_tensors; then pass `required`,
    since non-persistent buffers are in no file) or a mapping from the file's key names to the tensors
    they go into (for formats whose keys are not the module's). Nothing is copied unless all fits."""
    import torch

    own = module_tensors(target) if isinstance(target, torch.nn.Module) else target
    check_keys(own, tensors, path, required, what)
    with torch.no_grad():
        for key, tensor in tensors.items():
            own[key].copy_(tensor.to(own[key].dtype))


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a mapping; a missing, unreadable or malformed file is a UserError naming it
    (and the line, where the parser says)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"Config file {str(p)!r} does not exist.")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"Config file {str(p)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}.") from None
    except UnicodeDecodeError:
        raise UserError(f"Config file {str(p)!r} is not UTF-8 text.") from None
    except (ValueError, RecursionError) as e:  # an impossible date (2024-13-45), nesting too deep to parse
        raise UserError(f"Config file {str(p)!r} is not valid YAML: {str(e)[:200] or type(e).__name__}.") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise UserError(f"Config file {str(p)!r} must be a mapping of sections (model, method, data, ...).")
    return tree
