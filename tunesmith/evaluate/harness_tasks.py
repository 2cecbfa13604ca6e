"""The lm-evaluation-harness tasks tunesmith ships: generated here, seeded, as harness task YAMLs over local JSONL
files, so `tunesmith eval --harness` runs offline (docs/evaluation.md). Nothing is downloaded.

    tunesmith_json_choice   multiple choice (loglikelihood): the demo task's JSON extraction (data/demo.py); the
                            right object against two with one value changed and one with a field left out
    tunesmith_qa_choice     multiple choice (loglikelihood): the free-text task's question on a short text
                            (data/qa.py); the right sentence against the friend's fact put in the person's name
                            (the distractor of the text) and two other values of the asked kind
    tunesmith_arithmetic    generate-until: "What is 37 + 58?", the last integer of the answer (" 95",
                            " 37 + 58 = 95") against the sum (exact match)

All three carry the tag `tunesmith`, so `--harness tunesmith` runs them together. Each task's folder holds its YAML
and `test.jsonl` (the scored rows) and `train.jsonl` (the few-shot pool, drawn distinct from the test rows). The
YAMLs name the JSONL files by absolute path (the harness reads `data_files` as given): moved elsewhere, write them
again. Multiple-choice rows are {"query", "choices", "gold"}; the harness scores each choice's log-likelihood
after "query\\nAnswer:" and takes the highest (acc) or the highest per byte (acc_norm).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunesmith.files import atomic_write_text

VERSION = 1  # bump when a generator changes: the cached copy in $TUNESMITH_CACHE/harness is keyed by it
TAG = "tunesmith"
N_TEST, N_TRAIN = 200, 20


def json_choice_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` demo extraction rows as multiple choice: the canonical answer and three distinct mistakes."""
    from tunesmith.data.demo import demo_rows, mistake, prompt_messages, reference_answer

    rng = random.Random(f"harness-json-{seed}")
    out = []
    for row in demo_rows(n, f"harness-{seed}"):  # a stream of its own, not the rows `data demo` trains on
        answer = reference_answer(row)
        wrong: list[str] = []
        for kind in ("wrong_value", "wrong_value", "missing_field"):
            while (choice := mistake(answer, rng, kind)) in wrong:
                pass
            wrong.append(choice)
        out.append(shuffled(prompt_messages(row)[-1]["content"], answer, wrong, rng))
    return out


def qa_choice_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` free-text rows (data/qa.py's facts and phrasings) as multiple choice: the asked fact's answer sentence,
    the friend's fact of that kind in the person's name, and the answer sentence of two other people's facts."""
    from tunesmith.data.demo import CITIES, NAMES
    from tunesmith.data.qa import ASK, FACTS, FRIEND, person

    rng = random.Random(f"harness-qa-{seed}")
    out, seen = [], set()
    while len(out) < n:
        name, friend = rng.sample(NAMES, 2)
        facts = person(rng, name, rng.choice(CITIES))
        other = person(rng, friend, rng.choice([c for c in CITIES if c != facts["city"]]))
        kinds = rng.sample(list(FACTS), rng.randint(3, 4))
        asked = rng.choice(kinds)
        sentences = [rng.choice(FACTS[kind][0]).format(**facts) for kind in kinds]
        sentences.insert(rng.randint(0, len(sentences)), f"{friend}, a friend of {name}, "
                         f"{FRIEND[asked].format(**other)}.")
        query = f"{rng.choice(ASK)}\nText: {' '.join(sentences)}\nQuestion: {rng.choice(FACTS[asked][1]).format(**facts)}"
        form = FACTS[asked][2]
        answer = form.format(**facts)
        wrong = [form.format(**{**other, "n": name})]
        while len(wrong) < 3:
            choice = form.format(**{**person(rng, name, rng.choice(CITIES)), "n": name})
            if choice != answer and choice not in wrong:
                wrong.append(choice)
        if query not in seen and answer not in wrong:
            seen.add(query)
            out.append(shuffled(query, answer, wrong, rng))
    return out


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct sums and differences of two numbers under 100: {"question", "answer"}, the answer a string."""
    rng = random.Random(f"harness-arithmetic-{seed}")
    out, seen = [], set()
    while len(out) < n:
        a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-")
        if (a, b, op) not in seen:
            seen.add((a, b, op))
            out.append({"question": f"What is {a} {op} {b}?", "answer": str(a + b if op == "+" else a - b)})
    return out


def shuffled(query: str, answer: str, wrong: list[str], rng: random.Random) -> dict:
    choices = [answer, *wrong]
    rng.shuffle(choices)
    return {"query": query, "choices": choices, "gold": choices.index(answer)}


MULTIPLE_CHOICE = {
    "output_type": "multiple_choice",
    "doc_to_text": "{{query}}\nAnswer:",
    "doc_to_choice": "choices",
    "doc_to_target": "gold",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
}
GENERATE = {
    "output_type": "generate_until",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{answer}}",
    "generation_kwargs": {"until": ["\n", "Question:"], "do_sample": False, "max_gen_toks": 16},
    # the last integer of the answer is the model's answer: " 95", " 37 + 58 = 95" (small models restate the sum)
    "filter_list": [{"name": "last-integer", "filter": [
        {"function": "regex", "regex_pattern": r"(-?[0-9]+)", "group_select": -1}, {"function": "take_first"}]}],
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
}
TASKS = {  # name -> (row generator, the YAML fields of its kind)
    "tunesmith_json_choice": (json_choice_rows, MULTIPLE_CHOICE),
    "tunesmith_qa_choice": (qa_choice_rows, MULTIPLE_CHOICE),
    "tunesmith_arithmetic": (arithmetic_rows, GENERATE),
}


def task_config(name: str, folder: Path, fields: dict) -> dict:
    """The harness task config of `name` over folder/test.jsonl (scored) and folder/train.jsonl (few-shot)."""
    files = {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")}
    return {"task": name, "tag": [TAG], "dataset_path": "json", "dataset_kwargs": {"data_files": files},
            "training_split": "train", "fewshot_split": "train", "test_split": "test", **fields,
            "metadata": {"version": VERSION}}


def write_tasks(out: str | Path, seed: int = 0, n_test: int = N_TEST, n_train: int = N_TRAIN) -> dict[str, Path]:
    """Write every task's YAML and JSONL under out/<task>/; returns task name -> its YAML. The same seed gives the
    same rows; no query of the few-shot pool is a test query."""
    import yaml

    root = Path(out).resolve()
    written = {}
    for name, (rows_of, fields) in TASKS.items():
        rows = rows_of(n_test + n_train, seed)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, part in (("test", rows[:n_test]), ("train", rows[n_test:])):
            atomic_write_text(folder / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in part))
        written[name] = folder / f"{name}.yaml"
        atomic_write_text(written[name], yaml.safe_dump(task_config(name, folder, fields), sort_keys=False))
    return written


def builtin_tasks_dir(seed: int = 0) -> Path:
    """The built-in tasks, written once into tunesmith's cache ($TUNESMITH_CACHE/harness/tasks-v<VERSION>-seed<N>)
    and reused; the folder the harness's TaskManager is pointed at (include_path)."""
    from tunesmith.models.loading import cache_root

    folder = cache_root() / "harness" / f"tasks-v{VERSION}-seed{seed}"
    if not all((folder / name / f"{name}.yaml").is_file() for name in TASKS):
        write_tasks(folder, seed)
    return folder
