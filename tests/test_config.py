import re

import pytest
import yaml

from tunesmith.config import Config, load_config, parse_override, save_config
from tunesmith.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\nmethod:\n  r: 4\n")
    cfg = load_config(path, ["train.max_steps=40", "method.r=8", "method.target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == 1e-3
    assert cfg.train.max_steps == 40
    assert cfg.method.r == 8  # the command line wins over the file
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.name_or_path == "smollm2-135m-instruct"


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, "train:\n  learning_rate: 1\n"))
    assert "train.learning_rate" in str(e.value)
    assert "lr" in str(e.value) and "max_steps" in str(e.value)


def test_unknown_section(tmp_path):
    with pytest.raises(UserError, match="'trainer'"):
        load_config(write(tmp_path, "trainer: {}\n"))


def test_wrong_type_names_value(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(None, ["train.batch_size=eight"])
    assert "train.batch_size" in str(e.value) and "'eight'" in str(e.value)


def test_bad_choice_lists_allowed():
    with pytest.raises(UserError) as e:
        load_config(None, ["train.schedule=cosin"])
    msg = str(e.value)
    assert "train.schedule" in msg and "cosine" in msg and "linear" in msg


def test_out_of_range():
    with pytest.raises(UserError, match="method.r"):
        load_config(None, ["method.r=0"])


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(UserError, match="section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(UserError, match="line"):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_sft_on_text_is_rejected():
    with pytest.raises(UserError, match="causal_lm"):
        load_config(None, ["objective.name=sft", "data.format=text"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=3", "output.dir=x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = Config.model_validate(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


# A measured figure: "2.7x faster", "40% more", "15 % slower", "20-35 s", "991 MB". Such numbers go
# stale in a help text; docs/speed.md keeps them with the machine and date they were measured on.
MEASURED = re.compile(
    r"\d+(\.\d+)?\s?(x|%)\s(faster|slower|less|more|smaller|larger|fewer|quicker)\b"
    r"|\d+(\.\d+)?(-\d+(\.\d+)?)?\s?(s|ms|min|KB|MB|GB|KiB|MiB|GiB)\b"
)


def test_no_measured_figures_in_option_descriptions():
    """Option help says what an option does and points to docs/speed.md; it quotes no measurements."""
    import tunesmith.config as config

    def sections(model):
        for field in model.model_fields.values():
            if isinstance(field.annotation, type) and issubclass(field.annotation, config.Section):
                yield field.annotation
                yield from sections(field.annotation)

    checked = 0
    for section in {*sections(config.Config), *config.Section.__subclasses__()}:
        for key, field in section.model_fields.items():
            found = MEASURED.search(field.description or "")
            assert not found, f"{section.__name__}.{key}: {found.group(0)!r} in {field.description!r}"
            checked += 1
    assert checked > 40  # every section was walked
    for example in ("2.7x faster", "11x less", "40% more", "18 % slower", "20-35 s", "991 MB"):
        assert MEASURED.search(example), example
    assert not MEASURED.search("4.127 instead of 4.5 bits per weight; runs of 50 micro-batches")
