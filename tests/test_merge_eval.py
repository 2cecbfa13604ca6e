"""`tunesmith merge RECIPE OUT --eval EVAL.yaml --sweep KEY=...` (tunesmith/merge/evaluate.py) on the tiny model."""

from __future__ import annotations

import json

import pytest
import yaml
from test_merge_adapters import adapters, trained  # noqa: F401 (fixtures: two LoRA adapters on the tiny base)
from test_methods_merge import base_dir  # noqa: F401

from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.merge.config import parse_recipe
from tunesmith.merge.evaluate import parse_sweeps, sweep_points, with_setting


def eval_config(path, base_dir, test_file, rows):
    test_file.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in rows))
    path.write_text(yaml.safe_dump({"model": {"name_or_path": str(base_dir)}, "data": {"test": str(test_file)},
                                    "eval": {"metrics": ["perplexity"], "bootstrap": 0}}))
    return path


def test_merge_eval_scores_inputs_and_every_sweep_point_on_every_set(tmp_path, base_dir, adapters, capsys):
    recipe = {"models": [{"model": str(adapters[0]), "parameters": {"weight": 0.5}},
                         {"model": str(adapters[1]), "parameters": {"weight": 0.5}}],
              "merge_method": "linear", "output": "adapter"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    one = eval_config(tmp_path / "greet.yaml", base_dir, tmp_path / "greet.jsonl", [("Say hello.", "hello world")] * 3)
    two = eval_config(tmp_path / "capital.yaml", base_dir, tmp_path / "capital.jsonl",
                      [("Capital of France?", "Paris."), ("Capital of Italy?", "Rome.")])
    out = tmp_path / "out"
    code = main(["merge", str(tmp_path / "recipe.yaml"), str(out), "--eval", str(one), "--eval", str(two),
                 "--sweep", "weight=1,0"])
    assert code in (None, 0)
    report = json.loads((out / "merge_eval.json").read_text())
    rows = {r["name"]: r["scores"] for r in report["rows"]}
    assert list(rows) == [str(adapters[0]), str(adapters[1]), "weight=1", "weight=0"]
    assert (out / "weight=1" / "adapter_config.json").is_file() and (out / "weight=0").is_dir()
    for s in ("greet", "capital"):  # weight 1: the first adapter alone; weight 0: the second
        assert rows["weight=1"][s]["perplexity"] == pytest.approx(rows[str(adapters[0])][s]["perplexity"], rel=1e-4)
        assert rows["weight=0"][s]["perplexity"] == pytest.approx(rows[str(adapters[1])][s]["perplexity"], rel=1e-4)
        assert rows["weight=1"][s]["perplexity"] != pytest.approx(rows["weight=0"][s]["perplexity"], rel=1e-3)
    table = (out / "merge_eval.md").read_text()
    assert "| model | greet: perplexity (lower is better) | capital: perplexity (lower is better) |" in table
    assert table in capsys.readouterr().err + "\n"


def test_sweep_settings(tmp_path):
    recipe = parse_recipe({"models": [{"model": "a", "parameters": {"weight": 1.0}},
                                      {"model": "b", "parameters": {"weight": 1.0}},
                                      {"model": "c", "parameters": {"weight": 1.0, "density": 0.9}},
                                      {"model": "base"}],
                           "base_model": "base", "merge_method": "ties"})
    weights = [(e.parameters or {}).get("weight") for e in with_setting(recipe, "weight", 0.4).models]
    assert weights == [0.4, pytest.approx(0.3), pytest.approx(0.3), None]  # the base takes no weight
    dense = with_setting(recipe, "density", 0.5)
    assert [(e.parameters or {}).get("density") for e in dense.models] == [0.5, 0.5, 0.5, None]
    assert with_setting(recipe, "lambda", 2.0).parameters == {"lambda": 2.0}
    assert with_setting(recipe, "models.1.density", 0.2).models[1].parameters == {"weight": 1.0, "density": 0.2}
    points = sweep_points(recipe, parse_sweeps(["weight=0.2,0.8", "density=0.5,1"]))
    assert [label for label, _ in points] == ["weight=0.2 density=0.5", "weight=0.2 density=1",
                                              "weight=0.8 density=0.5", "weight=0.8 density=1"]
    with pytest.raises(UserError, match="not a parameter of ties"):
        with_setting(recipe, "t", 0.5)
    with pytest.raises(UserError, match="KEY=V1,V2"):
        parse_sweeps(["weight=a,b"])
    assert main(["merge", "r.yaml", str(tmp_path / "o"), "--sweep", "weight=0.5"]) == 2  # --sweep needs --eval
