"""The built-in demo task: strict JSON extraction, generated here, seeded, nothing downloaded.

Each row is a short conversation in the messages format:

    user:      Extract name, age and city as JSON.
               Text: Meet Priya, a 34-year-old from Lyon.
    assistant: {"name": "Priya", "age": 34, "city": "Lyon"}

The answer is always `json.dumps(record, separators=(", ", ": "))` with a fixed key order, so
a prediction is either exactly right or measurably wrong. Sentences come from several templates
filled with varied names, places and numbers, and no prompt appears in two splits, so a model
has to learn to extract rather than to remember. A base instruct model tends to answer in
prose or a code fence; a few minutes of LoRA on a CPU teaches it the exact form.

The `hard` variant adds nested objects, lists, optional values (null when the text does not
say) and dates to normalise, for comparing methods on a task that is not solved in minutes.

For preference objectives the same rows come as pairs ({"prompt", "chosen", "rejected"}, in
TRL's conversational form) and as unpaired rows ({"prompt", "completion", "label"}, about half of
them true). The right answer is the canonical one; a wrong one is a plausible mistake of one of
four kinds, drawn by a generator seeded apart from the rows' (so the SFT files do not change):

    wrong_value    {"name": "Priya", "age": 43, "city": "Lyon"}        one value changed
    missing_field  {"name": "Priya", "city": "Lyon"}                   one field left out
    prose          Here is the JSON:\\n{"name": "Priya", ...}          the answer wrapped in words
    truncated      {"name": "Priya", "age": 3                          cut short
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from tunesmith.errors import UserError
from tunesmith.evaluate.metrics.json_valid import parse_object  # noqa: F401 (the demo's answers, re-exported)
from tunesmith.files import atomic_write_text

NAMES = ["Ada", "Priya", "Mateo", "Yuki", "Omar", "Lena", "Kwame", "Sofia", "Liam", "Mei", "Ivan", "Amara",
         "Noah", "Chloe", "Ravi", "Elena", "Tariq", "Hannah", "Diego", "Ingrid", "Kofi", "Aisha", "Felix", "Nadia",
         "Hugo", "Zara", "Emil", "Leila", "Oscar", "Rosa", "Jonas", "Maya", "Tomas", "Freya", "Samir", "Clara"]
CITIES = ["London", "Lyon", "Osaka", "Lagos", "Lima", "Oslo", "Pune", "Quebec", "Porto", "Cairo", "Denver", "Hanoi",
          "Krakow", "Nairobi", "Seville", "Dublin", "Austin", "Bergen", "Accra", "Leeds", "Turin", "Perth", "Tunis",
          "Malmo", "Ghent", "Busan", "Bogota", "Zurich", "Halifax", "Munich"]
COUNTRIES = {"London": "UK", "Lyon": "France", "Osaka": "Japan", "Lagos": "Nigeria", "Lima": "Peru", "Oslo": "Norway",
             "Pune": "India", "Porto": "Portugal", "Cairo": "Egypt", "Hanoi": "Vietnam", "Dublin": "Ireland",
             "Accra": "Ghana", "Turin": "Italy", "Busan": "South Korea", "Bogota": "Colombia", "Zurich": "Switzerland"}
PRODUCTS = ["blue notebook", "USB cable", "coffee mug", "desk lamp", "phone case", "yoga mat", "water bottle",
            "wool scarf", "tea kettle", "bike light", "sketch pad", "rain jacket", "oak shelf", "steel pan",
            "travel pillow", "chess set", "garden hose", "laptop stand", "cotton tote", "wall clock"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
EVENTS = ["book club", "jazz night", "chess meetup", "coding workshop", "charity run", "film screening",
          "pottery class"]
VENUES = ["the Old Library", "Hall B", "the Riverside Cafe", "Studio 4", "the Town Hall", "Pier 9"]


def canonical(record: dict) -> str:
    """The one accepted spelling of an answer."""
    return json.dumps(record, separators=(", ", ": "))


def price(rng: random.Random) -> str:
    """A price whose written form and JSON form agree digit for digit (no trailing zero: 4.05, never 4.50)."""
    cents = rng.choice([c for c in range(1, 100) if c % 10])
    return f"{rng.randint(1, 120)}.{cents:02d}"


# --- easy: three flat fields ------------------------------------------------------------------

PERSON_ASKS = ["Extract name, age and city as JSON.", "Return the name, age and city as a JSON object.",
               "Give me JSON with keys name, age, city."]
PERSON_SENTENCES = ["{name} is {age} years old and lives in {city}.", "Meet {name}, a {age}-year-old from {city}.",
                    "{city} resident {name} turned {age} last month.", "At {age}, {name} moved to {city} for work.",
                    "My neighbour {name} ({age}) just got back to {city}.", "{name}, age {age}, grew up in {city}."]
ORDER_ASKS = ["Extract product, quantity and price as JSON.", "Return the product, quantity and unit price as JSON.",
              "Give me JSON with keys product, quantity, price."]
ORDER_SENTENCES = ["Please send {quantity} x {product} at ${price} each.",
                   "Order: {product}, qty {quantity}, ${price} per unit.",
                   "We need {quantity} units of the {product}; the quote was ${price} apiece.",
                   "Can I get {quantity} of the {product}? It says ${price} each.",
                   "{quantity} {product} items were bought for ${price} each."]


def easy_person(rng: random.Random) -> tuple[str, str, dict]:
    rec = {"name": rng.choice(NAMES), "age": rng.randint(18, 90), "city": rng.choice(CITIES)}
    return rng.choice(PERSON_ASKS), rng.choice(PERSON_SENTENCES).format(**rec), rec


def easy_order(rng: random.Random) -> tuple[str, str, dict]:
    shown = {"product": rng.choice(PRODUCTS), "quantity": rng.randint(1, 48), "price": price(rng)}
    rec = dict(shown, price=float(shown["price"]))
    return rng.choice(ORDER_ASKS), rng.choice(ORDER_SENTENCES).format(**shown), rec


# --- hard: nested, optional (null when unsaid), lists, normalised dates ------------------------


def hard_person(rng: random.Random) -> tuple[str, str, dict]:
    name, city = rng.choice(NAMES), rng.choice(list(COUNTRIES))
    age = rng.choice([None, rng.randint(18, 90)])
    email = rng.choice([None, f"{name.lower()}{rng.randint(1, 99)}@example.com"])
    text = rng.choice(["{n} lives in {c}, {k}.", "{n} is based in {c} ({k}).", "Originally from {c}, {k}: {n}."])
    text = text.format(n=name, c=city, k=COUNTRIES[city])
    text += f" {name} is {age}." if age is not None else ""
    text += f" Write to {email}." if email else ""
    rec = {"name": name, "age": age, "address": {"city": city, "country": COUNTRIES[city]}, "email": email}
    return "Extract JSON: name, age, address {city, country}, email; null if not stated.", text, rec


def hard_order(rng: random.Random) -> tuple[str, str, dict]:
    items = [{"product": p, "quantity": rng.randint(1, 12), "price": price(rng)}
             for p in rng.sample(PRODUCTS, rng.randint(1, 3))]
    coupon = rng.choice([None, f"SAVE{rng.randint(5, 30)}"])
    express = rng.random() < 0.5
    customer = rng.choice(NAMES)
    listed = " and ".join(f"{i['quantity']} x {i['product']} (${i['price']})" for i in items)
    text = f"{customer} ordered {listed}" + (", express shipping" if express else "")
    text += f", code {coupon}." if coupon else "."
    rec = {"customer": customer, "items": [dict(i, price=float(i["price"])) for i in items], "express": express,
           "coupon": coupon}
    return "Extract JSON: customer, items [{product, quantity, price}], express, coupon; null if not stated.", text, rec


def hard_event(rng: random.Random) -> tuple[str, str, dict]:
    month, day, year = rng.randint(1, 12), rng.randint(1, 28), rng.randint(2024, 2027)
    title, venue, city = rng.choice(EVENTS), rng.choice(VENUES), rng.choice(CITIES)
    capacity = rng.choice([None, rng.randint(10, 300)])
    text = rng.choice(["The {t} is on {m} {d}, {y} at {v} in {c}.", "Join the {t} at {v}, {c}, {m} {d}, {y}."])
    text = text.format(t=title, m=MONTHS[month - 1], d=day, y=year, v=venue, c=city)
    text += f" Room for {capacity} people." if capacity else ""
    rec = {"title": title, "date": f"{year}-{month:02d}-{day:02d}", "venue": {"name": venue, "city": city},
           "capacity": capacity}
    return "Extract JSON: title, date (YYYY-MM-DD), venue {name, city}, capacity; null if not stated.", text, rec


VARIANTS: dict[str, list[Callable[[random.Random], tuple[str, str, dict]]]] = {
    "easy": [easy_person, easy_order],
    "hard": [hard_person, hard_order, hard_event],
}


def demo_rows(n: int, seed: int = 0, variant: str = "easy") -> list[dict]:
    """`n` distinct conversations ({"messages": [user, assistant]}); the same seed gives the same rows."""
    if variant not in VARIANTS:
        raise UserError(f"Unknown demo variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    rng = random.Random(seed)
    rows, seen = [], set()
    for _ in range(50 * n + 100):  # duplicates are rare; the bound only guards against a tiny template space
        if len(rows) == n:
            return rows
        ask, sentence, record = rng.choice(VARIANTS[variant])(rng)
        prompt = f"{ask}\nText: {sentence}"
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": canonical(record)}]})
    raise ValueError(f"could only make {len(rows)} distinct {variant} demo rows of {n}")


def write_demo(out_dir: str | Path, seed: int = 0, n_train: int = 800, n_validation: int = 100, n_test: int = 100,
               variant: str = "easy") -> dict[str, Path]:
    """Write train/validation/test .jsonl files (no prompt in two of them), the same rows as preference pairs
    (preference_<split>.jsonl), as unpaired rows (unpaired_train, unpaired_validation) and as prompts for online
    RL ({"prompt", "answer"}: prompt_<split>.jsonl, scored by the rewards of rl/rewards.py); returns name -> path."""
    rows = demo_rows(n_train + n_validation + n_test, seed, variant)
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_validation),
              "test": (n_train + n_validation, len(rows))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, (a, b) in bounds.items():
        paths[split] = out / f"{split}.jsonl"
        atomic_write_text(paths[split], "".join(json.dumps(r) + "\n" for r in rows[a:b]))
    rng = random.Random(f"mistakes-{seed}")  # a stream of its own: the rows above stay as they were
    for split, (a, b) in bounds.items():
        paths[f"preference_{split}"] = out / f"preference_{split}.jsonl"
        pairs = [preference_row(r, rng) for r in rows[a:b]]
        atomic_write_text(paths[f"preference_{split}"], "".join(json.dumps(r) + "\n" for r in pairs))
    for split in ("train", "validation"):
        a, b = bounds[split]
        paths[f"unpaired_{split}"] = out / f"unpaired_{split}.jsonl"
        unpaired = unpaired_rows(rows[a:b], rng)
        atomic_write_text(paths[f"unpaired_{split}"], "".join(json.dumps(r) + "\n" for r in unpaired))
    for split, (a, b) in bounds.items():  # no randomness: the files above stay as they were
        paths[f"prompt_{split}"] = out / f"prompt_{split}.jsonl"
        prompts = [{"prompt": prompt_messages(r), "answer": reference_answer(r)} for r in rows[a:b]]
        atomic_write_text(paths[f"prompt_{split}"], "".join(json.dumps(r) + "\n" for r in prompts))
    return paths


# --- preference pairs and unpaired rows: the right answer and plausible mistakes ---------------------

MISTAKES = ("wrong_value", "missing_field", "prose", "truncated")
PROSE = ["Here is the JSON:\n{}", "Sure! {}", "```json\n{}\n```", "{}\nLet me know if you need anything else.",
         "The extracted data is {}."]
POOLS = [NAMES, CITIES, sorted(set(COUNTRIES.values())), PRODUCTS, EVENTS, VENUES]


def preference_row(row: dict, rng: random.Random) -> dict:
    """A demo conversation as a pair: the right answer chosen, a plausible mistake rejected."""
    answer = reference_answer(row)
    return {"prompt": prompt_messages(row), "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": mistake(answer, rng)}]}


def unpaired_rows(rows: list[dict], rng: random.Random) -> list[dict]:
    """Each conversation once, half of them (shuffled) with the right answer labelled true, the rest with a
    mistake labelled false."""
    labels = [True] * (len(rows) - len(rows) // 2) + [False] * (len(rows) // 2)
    rng.shuffle(labels)
    out = []
    for row, label in zip(rows, labels):
        answer = reference_answer(row)
        out.append({"prompt": prompt_messages(row),
                    "completion": [{"role": "assistant", "content": answer if label else mistake(answer, rng)}],
                    "label": label})
    return out


def mistake(answer: str, rng: random.Random, kind: str | None = None) -> str:
    """A wrong answer of `kind` (drawn from MISTAKES if None) that a model could plausibly give; never `answer`."""
    kind = kind or rng.choice(MISTAKES)
    record = json.loads(answer)
    if kind == "wrong_value":
        path = rng.choice(value_paths(record))
        parent = record
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = wrong(parent[path[-1]], rng)
        return canonical(record)
    if kind == "missing_field":
        del record[rng.choice(list(record))]
        return canonical(record)
    if kind == "prose":
        return rng.choice(PROSE).format(answer)
    if kind == "truncated":
        return answer[: rng.randint(len(answer) // 3, len(answer) - 1)].rstrip()
    raise ValueError(f"unknown mistake kind {kind!r}")


def value_paths(value: Any, path: tuple = ()) -> list[tuple]:
    """The key/index path of every leaf that is not null ("null if not stated" stays right)."""
    if isinstance(value, dict):
        return [p for key, child in value.items() for p in value_paths(child, path + (key,))]
    if isinstance(value, list):
        return [p for i, child in enumerate(value) for p in value_paths(child, path + (i,))]
    return [] if value is None else [path]


def wrong(value: Any, rng: random.Random) -> Any:
    """A different value of the same kind: another name or city, a nearby number, a changed digit."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        step = rng.choice([-10, -2, -1, 1, 2, 10])
        return value + step if value + step > 0 else value + abs(step)
    if isinstance(value, float):
        cents = round(value * 100) + rng.choice([-100, -9, 9, 100])
        return (cents if cents > 0 else cents + 200) / 100
    for pool in POOLS:
        if value in pool:
            return rng.choice([v for v in pool if v != value])
    digits = [i for i, c in enumerate(value) if c.isdigit()]
    if digits:
        i = rng.choice(digits)
        return value[:i] + rng.choice([d for d in "0123456789" if d != value[i]]) + value[i + 1 :]
    return value + "s"


# --- what the evaluator needs --------------------------------------------------------------------


def prompt_messages(fields: dict) -> list[dict]:
    """The conversation up to (not including) the last assistant message: what the model answers."""
    messages = fields["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [dict(m) for m in messages[:last]]


def reference_answer(fields: dict) -> str:
    """The last assistant message: the expected answer."""
    return [m for m in fields["messages"] if m["role"] == "assistant"][-1]["content"]


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    """The demo task's scores, percentages (0-100) over the rows (tunesmith/evaluate/metrics/ defines each):

    exact_match     prediction == reference, ignoring surrounding whitespace
    valid_json      prediction parses as a JSON object (strictly: no code fence, no prose)
    field_accuracy  of all leaf fields in the references ("address.city", "items[0].price"),
                    the share whose value the parsed prediction has at the same place; only
                    reported when some reference is a JSON object
    """
    from tunesmith.config import EvalConfig
    from tunesmith.evaluate.metrics import JSON_DEFAULTS, Inputs
    from tunesmith.evaluate.metrics.scoring import score_answers

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    inputs = Inputs(list(predictions), list(references), [{} for _ in references], EvalConfig())
    return score_answers(JSON_DEFAULTS, inputs).scores
