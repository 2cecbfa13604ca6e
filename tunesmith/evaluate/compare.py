"""`tunesmith eval CONFIG --adapter A --adapter B --base`: several saved artifacts scored on the same test rows.

What each path is, by what it holds:

    a folder with adapter_config.json            an adapter (PEFT format), applied to model.name_or_path
    a folder with tunesmith_artifact.json        a tunesmith artifact (full, freeze, adapter, delta_lora), likewise
    a run directory (output.dir) with adapter/   that adapter
    a folder with config.json                    a model (e.g. `tunesmith merge`'s output)
    a .gguf file                                 a model (converted once and cached, as model.name_or_path would be)

Every one is scored with the same rows, metrics and generation settings. The first (the base with
--base) is the reference: the others get their paired difference from it, each score's bootstrap
resamples drawn on the same rows for all (metrics/bootstrap.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import UserError


@dataclass(frozen=True)
class Target:
    name: str  # its column in the table
    path: str | None  # None: model.name_or_path of the config
    kind: str  # "base", "adapter" or "model"


def artifact_kind(path: Path) -> tuple[str, Path]:
    """("adapter" or "model", the path to load) for a saved artifact; a UserError naming what was looked for."""
    from tunesmith.methods.artifact import ARTIFACT_NAME

    if path.is_file() and path.suffix == ".gguf":
        return "model", path
    for folder in (path, path / "adapter"):
        if (folder / "adapter_config.json").is_file() or (folder / ARTIFACT_NAME).is_file():
            return "adapter", folder
    if (path / "config.json").is_file():
        return "model", path
    raise UserError(f"{str(path)!r} is not an artifact tunesmith eval can score: it is neither a .gguf file nor a "
                    f"folder with adapter_config.json or {ARTIFACT_NAME} (an adapter), config.json (a model), or "
                    "adapter/ (a run directory).")


def targets(artifacts: list[str], base: bool) -> list[Target]:
    """What to score, in order: the base (if asked for, or if nothing else is), then each artifact."""
    chosen = [Target("base", None, "base")] if base or not artifacts else []
    for given in artifacts:
        kind, path = artifact_kind(Path(given))
        name, i = given, 2
        while any(t.name == name for t in chosen):
            name, i = f"{given} ({i})", i + 1
        chosen.append(Target(name, str(path), kind))
    return chosen


def comparison(cfg, chosen: list[Target], results: list) -> dict:
    """Print the markdown table (stderr) and the JSON (stdout) of the evaluations `results` of `chosen`; return
    the JSON. One target: its flat scores, as `tunesmith eval` has always printed. Several: each one's scores,
    intervals and difference from the first."""
    from tunesmith.evaluate.metrics.scoring import compare
    from tunesmith.evaluate.report import comparison_table
    from tunesmith.evaluate.task import LEVEL, generation_settings

    compared = compare(results, cfg.eval.bootstrap, cfg.eval.seed, LEVEL) if cfg.eval.bootstrap else \
        [{"intervals": {}} for _ in results]
    report = {
        "reference": chosen[0].name,
        "rows": results[0].rows,
        "generation": generation_settings(cfg.eval),
        "bootstrap": {"resamples": cfg.eval.bootstrap, "seed": cfg.eval.seed, "level": LEVEL},
        "artifacts": [{"name": t.name, "path": t.path or cfg.model.name_or_path, "kind": t.kind, "scores": e.scores,
                       **c} for t, e, c in zip(chosen, results, compared)],
    }
    print(comparison_table(report, results[0].percent), file=sys.stderr)
    out = results[0].scores if len(results) == 1 else report
    print(json.dumps(out, indent=2))
    return out
