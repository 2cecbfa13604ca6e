"""Fuzzing the config loader: whatever the YAML file or the overrides hold, the outcome is a Config or
one UserError (exit code 2 with a message), never a traceback."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.config import Config, load_config
from tunesmith.errors import UserError

FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

SECTIONS = {name: list(field.annotation.model_fields) for name, field in Config.model_fields.items()}
KNOWN_KEYS = [f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.text(min_size=2000, max_size=5000, alphabet=st.characters(codec="utf-8")),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), inner, max_size=4)),
    max_leaves=12)
# A key: a real section/key most of the time, so validators are reached, or anything at all.
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=20),
                 st.lists(st.text(max_size=8), min_size=1, max_size=4).map(".".join))
# Values as typed on a command line: YAML-looking text, numbers, dates, flow collections, junk.
raw_values = st.one_of(
    st.text(max_size=40), st.integers().map(str), st.floats().map(str),
    st.sampled_from(["", "null", "~", "true", "yes", "[a, b", "{x: 1}", "[1, [2, [3]]]", "2024-13-45", "2001-02-30",
                     "1e999", "-.inf", ".nan", "!!python/object:os.system", "&a [*a]", "0x1F", "0o17", "1_000",
                     "12:30:00", "=", "'unterminated", "\x00", "\ud7ff", "a: b: c", "- - -"]),
)
overrides = st.one_of(st.text(max_size=60), st.builds(lambda k, v: f"{k}={v}", keys, raw_values))


def outcome(path, args) -> None:
    try:
        result = load_config(path, args)
    except UserError as e:
        assert str(e) and len(str(e)) < 20_000  # one readable message, even for huge values
        return
    assert isinstance(result, Config)


@FUZZ
@given(st.lists(overrides, max_size=5))
def test_arbitrary_overrides(args):
    outcome(None, args)


@FUZZ
@given(tree=st.dictionaries(st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=12)),
                            st.one_of(values, st.dictionaries(st.sampled_from(KNOWN_KEYS).map(lambda k: k.split(".")[1]),
                                                              values, max_size=5)),
                            max_size=6),
       args=st.lists(overrides, max_size=3))
def test_arbitrary_yaml_documents(tmp_path_factory, tree, args):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    outcome(path, args)


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_arbitrary_yaml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    outcome(path, [])


def test_pathological_documents(tmp_path):
    """Deep nesting, self-referencing aliases, exponential alias expansion, bad bytes, bad dates."""
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    documents = {
        "deep.yaml": "[" * 5000 + "]" * 5000,
        "cycle.yaml": "train: &t {lr: *t}\nmethod: &m [*m]\n",
        "laughs.yaml": laughs + "method:\n  target_modules: *i\n",
        "bytes.yaml": b"train:\n  lr: \xff\xfe\n",
        "date.yaml": "train:\n  lr: 2024-13-45\n",
        "tags.yaml": "train: !!python/object/apply:os.system ['echo hi']\n",
        "huge.yaml": "data:\n  train: " + "x" * 2_000_000 + "\nmodel:\n  dtype: " + "y" * 2_000_000 + "\n",
    }
    for name, content in documents.items():
        path = tmp_path / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        outcome(path, [])
    outcome(None, ["train.lr=" + "[" * 5000])
    outcome(None, ["train.lr=2024-13-45"])
