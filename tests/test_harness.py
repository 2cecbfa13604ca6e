"""`tunesmith eval --harness` (evaluate/harness.py) and the built-in harness tasks (evaluate/harness_tasks.py).

Parity: the scores tunesmith gets by wrapping the model it holds in memory in the harness's HFLM equal the
harness's own `hf` model loading the same weights from a folder (model_args "pretrained=<folder>"), and, with an
adapter active, the harness's `hf` model with `peft=<adapter folder>` (peft's LoRA against tunesmith's): the same
metrics, and every request's log-likelihood or generated answer, on the tiny random Llama and a few rows of each
built-in task. Everything offline."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer, lora_model
from tunesmith.cli import main
from tunesmith.config import MethodConfig
from tunesmith.errors import UserError
from tunesmith.evaluate import harness_tasks

pytest.importorskip("lm_eval")

TASKS = ["tunesmith_json_choice", "tunesmith_qa_choice", "tunesmith_arithmetic"]
LIMIT = 3
USER_CACHE = os.environ.get("TUNESMITH_CACHE")  # the `cache` fixture moves it for the tiny-model tests


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny model and tokenizer in a folder, a LoRA adapter on it (B random, so it changes the model) in a
    run directory, and a config naming the folder."""
    root = tmp_path_factory.mktemp("harness")
    build_tiny_model().save_pretrained(root / "base")
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(root / "base")
    model, method = lora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    method.save(model, root / "run" / "adapter", MethodConfig(r=4, alpha=8, dropout=0.0), "tiny")
    (root / "eval.yaml").write_text(f"model:\n  name_or_path: {root / 'base'}\noutput:\n  dir: {root / 'out'}\n")
    return root


@pytest.fixture(scope="module", autouse=True)
def no_environment_report():
    """simple_evaluate ends by running `pip list` and the like for its environment report (1.2 s a call); the
    scores do not depend on it."""
    import lm_eval.evaluator

    with pytest.MonkeyPatch.context() as m:
        m.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """tunesmith's cache (where the built-in tasks are written on demand) in a folder of this module."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TUNESMITH_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def reference(saved, cache):
    """reference("base" or "lora"): the harness on its own, its `hf` model built from the folder (with
    peft=<adapter folder> for lora), on the built-in tasks; each computed once."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tunesmith.evaluate.harness_tasks import builtin_tasks_dir

    done = {}

    def run(which: str) -> dict:
        if which not in done:
            args = f"pretrained={saved / 'base'},device=cpu" + (
                f",peft={saved / 'run' / 'adapter'}" if which == "lora" else "")
            manager = TaskManager(include_path=str(builtin_tasks_dir()), include_defaults=False)
            done[which] = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=TASKS, limit=LIMIT,
                                                  batch_size=16, task_manager=manager)
        return done[which]

    return run


def tunesmith_samples(root, cfg_path, target):
    """Each task's logged samples from tunesmith's in-memory HFLM on `target` (None: the base)."""
    from tunesmith.commands.infer import load_target
    from tunesmith.config import load_config
    from tunesmith.evaluate.harness import HarnessOptions, harness_model, run_tasks, task_manager

    cfg = load_config(str(cfg_path), [])
    model, tokenizer = load_target(cfg, target, "adapter" if target else "base")
    options = HarnessOptions(TASKS, limit=LIMIT)
    return run_tasks(harness_model(model, tokenizer, 16), task_manager(TASKS, []), options, log_samples=True)


def responses(results: dict, task: str, key: str = "filtered_resps") -> list:
    """Every request's answer of a task, in document order: (log-likelihood, is greedy) or generated text (key
    "resps": as generated, before the task's filter)."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [r for s in samples for r in s[key]]


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "lora"])
def test_in_memory_scores_equal_the_harness_hf_model(saved, reference, adapter):
    from tunesmith.evaluate.harness import scores

    ours = tunesmith_samples(saved, saved / "eval.yaml", str(saved / "run" / "adapter") if adapter else None)
    theirs = reference("lora" if adapter else "base")
    assert scores(ours) == scores(theirs) and set(scores(ours)) == set(TASKS)
    assert all(n["effective"] == LIMIT for n in ours["n-samples"].values())
    for task in TASKS:
        a, b = responses(ours, task), responses(theirs, task)
        assert len(a) == len(b) > 0
        if task == "tunesmith_arithmetic":  # greedy answers, the same text before and after the filter
            generated = responses(ours, task, "resps")
            assert a == b and generated == responses(theirs, task, "resps") and any(g[0].strip() for g in generated)
        else:  # (log-likelihood, greedy?) per choice; peft's LoRA and ours agree to float rounding
            assert [g for _, g in a] == [g for _, g in b]
            assert [x for x, _ in a] == pytest.approx([x for x, _ in b], abs=0 if not adapter else 1e-4)
    if adapter:  # the adapter changes what the model says: this compares two models, not one
        assert responses(reference("base"), "tunesmith_json_choice") != responses(theirs, "tunesmith_json_choice")


def test_eval_harness_compares_targets_in_one_table(saved, cache, capsys):
    out = saved / "h.json"
    assert main(["eval", str(saved / "eval.yaml"), "--base", "--adapter", str(saved / "run"), "--harness",
                 "tunesmith_json_choice, tunesmith_arithmetic", "--harness-limit", "2", "--harness-out",
                 str(out)]) == 0
    captured = capsys.readouterr()
    report = json.loads(out.read_text())
    assert json.loads(captured.out[captured.out.index("{"):]) == report
    assert [t["name"] for t in report["targets"]] == ["base", str(saved / "run")]
    assert [t["kind"] for t in report["targets"]] == ["base", "adapter"]
    for t in report["targets"]:
        assert set(t["scores"]) == {"tunesmith_json_choice", "tunesmith_arithmetic"}
        assert set(t["scores"]["tunesmith_json_choice"]) == {"acc", "acc_norm"}
        assert set(t["scores"]["tunesmith_arithmetic"]) == {"exact_match,last-integer"}
        assert t["n_samples"]["tunesmith_arithmetic"]["effective"] == 2
    assert f"| task | metric | base | {saved / 'run'} |" in captured.err
    assert "| tunesmith_json_choice | acc_norm | " in captured.err and " ± " in captured.err
    assert (cache / "harness").is_dir()  # the built-in tasks were written on demand


def test_unknown_task_names_how_to_list_tasks(saved, cache, monkeypatch, capsys):
    import lm_eval.tasks

    from tunesmith.evaluate.harness import parse_tasks, task_manager

    real = lm_eval.tasks.TaskManager  # the harness's own 14,000 configs take 8 s to index: left out here
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda include_path=None, include_defaults=True: real(
        include_path=include_path, include_defaults=False))
    with pytest.raises(UserError, match=r"Unknown harness task 'no_such_task'.*lm-eval ls tasks"):
        task_manager(["tunesmith_arithmetic", "no_such_task"], [])
    assert "tunesmith_arithmetic" in task_manager(["tunesmith_arithmetic"], []).all_tasks
    with pytest.raises(UserError, match="is not a folder"):
        task_manager(["tunesmith"], [str(saved / "nowhere")])
    with pytest.raises(UserError, match="names no task"):
        parse_tasks(" , ")
    assert parse_tasks("a, b,c") == ["a", "b", "c"]
    assert main(["eval", str(saved / "eval.yaml"), "--harness", "tunesmith", "--harness-limit", "0"]) == 2
    assert "--harness-limit 0" in capsys.readouterr().err
    assert main(["eval", str(saved / "eval.yaml"), "--harness", "no_such_task"]) == 2
    assert "lm-eval ls tasks" in capsys.readouterr().err


LOCAL_HELLASWAG = """task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_a_standard_benchmark_from_local_files(saved, tmp_path, capsys):
    """docs/evaluation.md's recipe: HellaSwag's YAML as the harness ships it, pointed at a local JSONL (two rows in
    HellaSwag's fields here), with the harness's utils.py copied beside it, run with --harness-include."""
    import shutil
    from pathlib import Path

    import lm_eval

    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py", mine / "utils.py")
    row = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
           "ctx_b": "then", "ctx": "", "endings": [", the man adds wax.", ", a woman walks by.", " he scrapes it off.",
                                                   " [title] He stops."], "source_id": "x", "split": "val",
           "split_type": "indomain", "label": "2"}
    (tmp_path / "hellaswag_val.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "label": "0"}) + "\n")
    (mine / "hellaswag_local.yaml").write_text(LOCAL_HELLASWAG.format(data=tmp_path / "hellaswag_val.jsonl"))
    assert main(["eval", str(saved / "eval.yaml"), "--harness", "hellaswag_local", "--harness-include", str(mine),
                 "--harness-out", str(tmp_path / "h.json")]) == 0
    (target,) = json.loads((tmp_path / "h.json").read_text())["targets"]
    assert target["n_samples"]["hellaswag_local"]["effective"] == 2
    assert target["scores"]["hellaswag_local"]["acc"]["value"] in (0.0, 0.5)  # the same row, labelled 2 and 0
    assert "| hellaswag_local | acc |" in capsys.readouterr().err


def test_lm_eval_missing_is_a_user_error_naming_the_extra(saved, monkeypatch, capsys):
    from tunesmith.evaluate.harness import require_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'tunesmith\[harness\]'"):
        require_lm_eval()
    assert main(["eval", str(saved / "eval.yaml"), "--harness", "tunesmith"]) == 2
    assert "pip install 'tunesmith[harness]'" in capsys.readouterr().err


def test_task_files_are_seeded_and_well_formed(tmp_path):
    a = harness_tasks.write_tasks(tmp_path / "a", seed=0, n_test=30, n_train=5)
    b = harness_tasks.write_tasks(tmp_path / "b", seed=0, n_test=30, n_train=5)
    c = harness_tasks.write_tasks(tmp_path / "c", seed=1, n_test=30, n_train=5)
    assert set(a) == set(TASKS)
    for name in TASKS:
        rows = {s: (a[name].parent / f"{s}.jsonl").read_text() for s in ("test", "train")}
        assert rows["test"] == (b[name].parent / "test.jsonl").read_text()  # the same seed, the same rows
        assert rows["test"] != (c[name].parent / "test.jsonl").read_text()
        test, train = ([json.loads(line) for line in rows[s].splitlines()] for s in ("test", "train"))
        assert len(test) == 30 and len(train) == 5
        key = "question" if name == "tunesmith_arithmetic" else "query"
        assert not {r[key] for r in test} & {r[key] for r in train}  # no few-shot example is a test row
        for r in test:
            if key == "query":
                assert len(set(r["choices"])) == 4 and 0 <= r["gold"] < 4
            else:
                a_, op, b_ = r["question"].removeprefix("What is ").removesuffix("?").split()
                assert int(r["answer"]) == (int(a_) + int(b_) if op == "+" else int(a_) - int(b_))
    json_rows = [json.loads(line) for line in (a["tunesmith_json_choice"].parent / "test.jsonl").open()]
    assert all(json.loads(r["choices"][r["gold"]]) for r in json_rows)  # the right answer is the JSON object
    qa_rows = [json.loads(line) for line in (a["tunesmith_qa_choice"].parent / "test.jsonl").open()]
    # every choice is about the asked person (the name gives nothing away), and one is the friend's fact in that
    # person's name: a choice whose words the text states, but about the friend
    assert all(len({c.split()[0] for c in r["choices"]}) == 1 for r in qa_rows)


@pytest.mark.integration
def test_default_model_in_memory_equals_the_harness_hf_model_on_its_folder(tmp_path, monkeypatch):
    """The real default model, as tunesmith loads it, against the harness's `hf` model on the converted
    safetensors folder in the cache: the same scores on a few rows of the JSON multiple-choice task."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tunesmith.config import ModelConfig
    from tunesmith.evaluate.harness import HarnessOptions, harness_model, run_tasks, scores, task_manager
    from tunesmith.evaluate.harness_tasks import builtin_tasks_dir
    from tunesmith.models.loading import load_model_and_tokenizer, resolve_model_folder

    if USER_CACHE is None:  # the default model converted once, where the other integration tests find it
        monkeypatch.delenv("TUNESMITH_CACHE", raising=False)
    else:
        monkeypatch.setenv("TUNESMITH_CACHE", USER_CACHE)
    tasks = ["tunesmith_json_choice"]
    model, tokenizer = load_model_and_tokenizer(ModelConfig())
    ours = run_tasks(harness_model(model, tokenizer, 8), task_manager(tasks, []), HarnessOptions(tasks, limit=4))
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={resolve_model_folder(ModelConfig())},device=cpu,dtype=float32",
        tasks=tasks, limit=4, batch_size=8,
        task_manager=TaskManager(include_path=str(builtin_tasks_dir()), include_defaults=False))
    assert scores(ours) == scores(theirs) and set(scores(ours)) == set(tasks)
