"""The built-in free-text task: a short text about a person, a question, a one-sentence answer. Seeded, nothing
downloaded (`tunesmith data demo --task qa`).

    user:      Answer the question in one sentence.
               Text: Every morning Priya cycles to the office. Priya has been a nurse for 7 years.
               Omar, a friend of Priya, is a baker. Priya came to Lyon in 2016.
               Question: What does Priya do for a living?
    assistant: Priya works as a nurse.

The text states three or four facts about one person, in phrasings drawn from several templates,
and one fact of the same kind about a friend (the distractor a careless answer picks). The answer
restates the asked fact in one fixed sentence form per question kind, so a right answer shares
most of its words with the reference without having to be the same string: the task where token
F1 and ROUGE-L say more than exact match. A base instruct model mostly finds the fact but words
it its own way, or answers in more than a sentence; a short LoRA run teaches it the form.

No prompt appears in two splits (the rows are drawn distinct, then split).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunesmith.data.demo import CITIES, NAMES
from tunesmith.files import atomic_write_text

JOBS = ["nurse", "baker", "pilot", "teacher", "plumber", "librarian", "chemist", "carpenter", "dentist", "architect",
        "journalist", "gardener", "engineer", "translator", "photographer", "pharmacist"]
HOBBIES = ["plays the violin", "goes hiking", "paints watercolours", "plays chess", "bakes bread", "goes sailing",
           "plays football", "sings in a choir", "repairs old bikes", "grows tomatoes", "goes climbing",
           "writes poems"]
PETS = ["cat", "dog", "parrot", "rabbit", "tortoise", "hamster", "goldfish"]
PET_NAMES = ["Biscuit", "Pepper", "Miso", "Luna", "Otto", "Ziggy", "Maple", "Noodle", "Pixel", "Clover"]
COMMUTES = {"cycles": "by bike", "walks": "on foot", "takes the train": "by train", "drives": "by car",
            "takes the bus": "by bus"}

# kind -> (phrasings in the text, questions, the answer's one form). {n}: the person; the rest: the fact.
FACTS = {
    "job": (["{n} has been {a_job} for {years} years.", "{n} works long shifts as {a_job}.",
             "By profession, {n} is {a_job}."],
            ["What does {n} do for a living?", "What is {n}'s job?"],
            "{n} works as {a_job}."),
    "city": (["{n}'s home is in {city}.", "{n} rents a small flat in {city}.", "These days {n} lives in {city}."],
             ["Where does {n} live?", "Which city does {n} live in?"],
             "{n} lives in {city}."),
    "hobby": (["On weekends, {n} {hobby}.", "Every Saturday {n} {hobby}.", "In free time, {n} {hobby}."],
              ["What does {n} do on weekends?", "What is {n}'s hobby?"],
              "{n} {hobby} on weekends."),
    "pet": (["{n} shares the flat with a {pet} named {pet_name}.", "{n} adopted a {pet} called {pet_name}."],
            ["What pet does {n} have?", "What animal lives with {n}?"],
            "{n} has a {pet} called {pet_name}."),
    "moved": (["{n} came to {city} in {year}.", "It was {year} when {n} moved to {city}."],
              ["When did {n} move to {city}?", "In which year did {n} arrive in {city}?"],
              "{n} moved to {city} in {year}."),
    "commute": (["Every morning {n} {commute} to the office.", "{n} usually {commute} to work."],
                ["How does {n} get to work?", "How does {n} travel to work?"],
                "{n} goes to work {how}."),
}
# The friend's fact of the asked kind, after "{friend}, a friend of {n}, ".
FRIEND = {"job": "is {a_job}", "city": "lives in {city}", "hobby": "{hobby} on weekends",
          "pet": "has a {pet} named {pet_name}", "moved": "came to {city} in {year}", "commute": "{commute} to work"}
ASK = ["Answer the question in one sentence.", "Read the text and answer in a single sentence.",
       "Answer briefly, in one full sentence."]


def person(rng: random.Random, name: str, city: str) -> dict:
    """One person's facts (a value for every placeholder of FACTS)."""
    commute, job = rng.choice(list(COMMUTES)), rng.choice(JOBS)
    return {"n": name, "a_job": f"{'an' if job[0] in 'aeiou' else 'a'} {job}", "years": rng.randint(2, 25),
            "city": city, "hobby": rng.choice(HOBBIES), "pet": rng.choice(PETS), "pet_name": rng.choice(PET_NAMES),
            "year": rng.randint(1995, 2024), "commute": commute, "how": COMMUTES[commute]}


def qa_row(rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) of one row."""
    name, friend = rng.sample(NAMES, 2)
    facts = person(rng, name, rng.choice(CITIES))
    other = person(rng, friend, rng.choice([c for c in CITIES if c != facts["city"]]))
    kinds = rng.sample(list(FACTS), rng.randint(3, 4))
    asked = rng.choice(kinds)
    sentences = [rng.choice(FACTS[kind][0]).format(**facts) for kind in kinds]
    distractor = f"{friend}, a friend of {name}, {FRIEND[asked].format(**other)}."
    sentences.insert(rng.randint(0, len(sentences)), distractor)
    question = rng.choice(FACTS[asked][1]).format(**facts)
    prompt = f"{rng.choice(ASK)}\nText: {' '.join(sentences)}\nQuestion: {question}"
    return prompt, FACTS[asked][2].format(**facts)


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct conversations ({"messages": [user, assistant]}); the same seed gives the same rows."""
    rng = random.Random(f"qa-{seed}")
    rows, seen = [], set()
    while len(rows) < n:
        prompt, answer = qa_row(rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return rows


def write_qa(out_dir: str | Path, seed: int = 0, n_train: int = 800, n_validation: int = 100,
             n_test: int = 100) -> dict[str, Path]:
    """train/validation/test .jsonl of the task (no prompt in two of them); returns split -> path."""
    rows = qa_rows(n_train + n_validation + n_test, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, start = {}, 0
    for split, size in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        paths[split] = out / f"{split}.jsonl"
        atomic_write_text(paths[split], "".join(json.dumps(r) + "\n" for r in rows[start : start + size]))
        start += size
    return paths
