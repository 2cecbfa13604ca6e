"""The trained encoder as a sentence-transformers folder, reloaded and checked, and an adapter run's PEFT adapter.

The folder is the base's own layout with new weights: every configuration file of the base folder (modules.json,
1_Pooling/, sentence_bert_config.json, config_sentence_transformers.json, the tokenizer's) is copied, and the
transformer (adapters merged into its weights: W0 + (alpha/r) B A for LoRA) is saved where the base's Transformer
module lives. A plain transformers base gets the modules.json that says what tunesmith computed for it: mean
pooling, no Normalize. So `sentence_transformers.SentenceTransformer(folder)` and `load_encoder(folder)` both load
it; before the command reports success, the folder is loaded back and must encode like the model in memory
(max abs difference <= 1e-5).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tunesmith.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ot", ".gguf")
SKIPPED_DIRS = ("onnx", "openvino", ".git", ".cache")
TOLERANCE = 1e-5


def copy_configuration(base: Path, out: Path) -> None:
    """Every file of `base` but weights (and ONNX/OpenVINO copies of them) into `out`, the same relative paths."""
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if path.is_dir() or rel.parts[0] in SKIPPED_DIRS or path.name.endswith(WEIGHT_SUFFIXES):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / rel)


def write_plain_pipeline(out: Path, dimension: int) -> None:
    """modules.json and 1_Pooling/config.json for a base without them: mean pooling, no Normalize."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": dimension, "pooling_mode_mean_tokens": True}, indent=2) + "\n", encoding="utf-8")


def export_encoder(encoder, base_folder: Path, out: Path, check_texts: list[str]) -> float:
    """Write `encoder` (adapters already merged) as a sentence-transformers folder at `out`, reload it with
    tunesmith and compare the embeddings of `check_texts`; returns the max abs difference (a UserError above
    TOLERANCE). The folder is written next to `out` first and renamed into place."""
    from tunesmith.embed.encoder import load_encoder

    base_folder, out = Path(base_folder), Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copy_configuration(base_folder, tmp)
    try:
        rel = encoder.spec.transformer_dir.resolve().relative_to(base_folder.resolve())
    except ValueError:
        rel = Path("")
    encoder.model.save_pretrained(tmp / rel, safe_serialization=True)
    encoder.tokenizer.save_pretrained(tmp / rel)
    if not (base_folder / "modules.json").is_file():
        write_plain_pipeline(tmp, encoder.dimension)
    bert_config = tmp / rel / "sentence_bert_config.json"  # the length cap trained with (data.max_seq_len)
    config = json.loads(bert_config.read_text(encoding="utf-8")) if bert_config.is_file() else {}
    config["max_seq_length"] = encoder.max_seq_length
    config.setdefault("do_lower_case", encoder.spec.do_lower_case)
    bert_config.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    reloaded = load_encoder(str(out), encoder.device)
    diff = float((reloaded.encode(check_texts) - encoder.encode(check_texts)).abs().max()) if check_texts else 0.0
    if diff > TOLERANCE:
        raise UserError(f"The exported encoder {out} encodes differently from the trained one (max abs difference "
                        f"{diff:.2e} > {TOLERANCE}); the folder is left for inspection.")
    return diff


def save_adapter_artifact(method, model: torch.nn.Module, out: Path, method_cfg, base: str) -> None:
    """The method's own artifact of the transformer (PEFT format for the LoRA family), marked as a feature
    extractor so peft.PeftModel.from_pretrained(AutoModel..., out) puts it on the plain encoder."""
    method.save(model, out, method_cfg, base)
    config_path = Path(out) / "adapter_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["task_type"] = "FEATURE_EXTRACTION"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
