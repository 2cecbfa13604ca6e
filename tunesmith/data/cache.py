"""Tokenised examples cached on disk (data.cache), so the next run with the same inputs skips tokenising.

Rendering chat templates and tokenising is the slow part of preparing data (minutes for a few
hundred thousand rows), and it gives the same result every time its inputs are the same. So the
result is stored in Arrow format with the `datasets` library, under a key that hashes
everything that decides it:

    the train and validation files     resolved path, size, modification time (ns)
    the data options                   format, max_seq_len, train_on_prompt, system_prompt,
                                       val_split and the split seed (only when a split is made)
    the objective                      objective.name (it decides how a row is encoded)
    the tokenizer                      class, name_or_path, its full serialisation (vocabulary,
                                       merges, normalizer, post-processor), special tokens, chat template
    tunesmith's data code              the source of the modules that read, split and encode, and
                                       of the objectives (their encode functions)

    $TUNESMITH_CACHE/data/<key>/       (default ~/.cache/tunesmith/data; $TUNESMITH_DATA_CACHE/<key>/
                                        when that is set)
        train/, validation/            datasets.save_to_disk (a split left empty has no folder)
        meta.json                      detected format, objective, row/truncated/dropped counts, the inputs

An entry is written into a temporary folder and renamed into place, so a killed run never
leaves a half-written one (concurrent writers, e.g. torchrun processes, race harmlessly: the
first rename wins). The newest KEEP entries are kept; a hit marks its entry as newest. Anything
going wrong with the cache is logged and the run tokenises as if there were none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from tunesmith.config import DataConfig
from tunesmith.files import atomic_write_json

log = logging.getLogger(__name__)

KEEP = 20  # cache entries kept; older ones are deleted
# The modules whose code decides the examples: a change to any of them is a new key.
DATA_CODE = ("data/readers.py", "data/formats.py", "data/tokenize.py", "data/preference.py", "data/dataset.py",
             "objectives/*.py")


def cache_dir() -> Path:
    """$TUNESMITH_DATA_CACHE, else the data folder of tunesmith's cache ($TUNESMITH_CACHE or ~/.cache/tunesmith)."""
    from tunesmith.models.loading import cache_root

    return Path(os.environ.get("TUNESMITH_DATA_CACHE") or cache_root() / "data")


def cache_key(cfg: DataConfig, tokenizer, seed: int, objective: str = "auto") -> str | None:
    """The hash of every input of the encoding; None (no caching) when an input cannot be identified."""
    try:
        files = [file_identity(p) for p in (cfg.train, cfg.validation) if p]
        tokenizer_id = tokenizer_fingerprint(tokenizer)
    except (OSError, AttributeError, TypeError):  # a missing file, or a tokenizer-like object we cannot hash
        return None
    inputs = {
        "files": files,
        "options": [cfg.format, cfg.max_seq_len, cfg.train_on_prompt, cfg.system_prompt],
        "objective": objective,
        "split": None if cfg.validation else [cfg.val_split, seed],  # the split depends on the seed
        "tokenizer": tokenizer_id,
        "code": code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def file_identity(path: str) -> list:
    """Path, size and modification time: an edited or replaced file gets a new identity, without reading it."""
    p = Path(path).resolve()
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: the whole tokenizer.json
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    described = [type(tokenizer).__name__, tokenizer.name_or_path, tokenizer.chat_template,
                 tokenizer.special_tokens_map, tokenizer.bos_token_id, tokenizer.eos_token_id]
    h.update(json.dumps(described, sort_keys=True, default=str).encode())
    return h.hexdigest()


def code_fingerprint() -> str:
    package = Path(__file__).parent.parent
    files = sorted(f for pattern in DATA_CODE for f in package.glob(pattern))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def load(key: str) -> dict | None:
    """{train, validation, format, stats, objective} from the cache, or None on a miss (or an unreadable entry)."""
    entry = cache_dir() / key
    if not (entry / "meta.json").is_file():
        return None
    try:
        from datasets import load_from_disk

        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        splits = {name: load_from_disk(str(entry / name)).to_list() if (entry / name).is_dir() else []
                  for name in ("train", "validation")}
        os.utime(entry)  # most recently used: kept longest by prune
    except Exception as e:  # a damaged entry is a miss, not a failed run; it goes, to be written anew
        log.warning("data cache: could not read %s (%s); tokenising again", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    log.info("data: tokenised examples read from the cache (%s)", entry)
    return {**splits, "format": meta["format"], "stats": meta["stats"], "objective": meta["objective"]}


def store(key: str, prepared, cfg: DataConfig) -> None:
    """Write an entry atomically (temporary folder, then rename); failures are logged, never raised."""
    root = cache_dir()
    tmp = root / f".tmp-{key}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, examples in (("train", prepared.train), ("validation", prepared.validation)):
            if examples:
                save_split(examples, tmp / name)
        meta = {"format": prepared.format, "stats": prepared.stats, "objective": prepared.objective,
                "train": cfg.train, "validation": cfg.validation,
                "max_seq_len": cfg.max_seq_len, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_json(tmp / "meta.json", meta)  # fsynced, so the renamed entry is whole after a crash
        os.rename(tmp, root / key)
        log.info("data: tokenised examples cached in %s", root / key)
    except Exception as e:  # a full disk or a read-only cache must not fail the run
        if not (root / key / "meta.json").is_file():  # else another process stored it first: fine
            log.warning("data cache: could not write %s (%s); continuing without it", root / key, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune(root, KEEP)


def save_split(examples: list[dict], path: Path) -> None:
    """Whatever columns the objective's examples have; Arrow infers their types."""
    from datasets import Dataset

    with quiet_datasets():
        Dataset.from_list(examples).save_to_disk(str(path))


@contextlib.contextmanager
def quiet_datasets():
    """No "Saving the dataset" progress bar in the training log."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def prune(root: Path, keep: int) -> None:
    """Delete all but the `keep` most recently used entries, and temporary folders a killed run left a day ago."""
    try:
        entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        stale = [p for p in root.glob(".tmp-*") if time.time() - p.stat().st_mtime > 86400]
    except OSError:
        return
    for path in entries[keep:] + stale:
        shutil.rmtree(path, ignore_errors=True)
