"""The command line: every subcommand registers its flags, and the options of generate, chat, merge and
quantize come from flags over a `--config FILE` section over the defaults. No model is loaded here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunesmith.cli import build_parser, main
from tunesmith.commands.options import resolve_options
from tunesmith.commands.artifacts import MergeConfig, QuantizeConfig
from tunesmith.commands.infer import GenerateConfig

FLAGS = {  # subcommand -> what its --help must list
    "train": ["config", "overrides", "train.max_steps", "method.target_modules"],
    "demo": ["overrides", "--out"],
    "eval": ["config", "overrides", "--adapter", "--base", "data.test", "eval.metrics", "--harness",
             "--harness-include", "--harness-limit"],
    "generate": ["prompt", "--model", "--adapter", "--max-new-tokens", "--system", "--quantization", "--config"],
    "chat": ["--model", "--adapter", "--max-new-tokens", "--system", "--quantization", "--config"],
    "merge": ["--adapter", "--out", "--model", "--quantization", "--config", "CONFIG.yaml", "OUT_DIR",
              "--random-seed"],
    "quantize": ["--model", "--out", "--bits", "--quant-type", "--no-double-quant", "--config"],
    "export": ["--model", "--adapter", "--format", "--type", "--out", "--quantization", "--config"],
    "data demo": ["--out", "--seed", "--task", "--variant"],
    "data harness": ["--out", "--seed"],
    "score": ["model", "data", "--out", "--batch-size", "--max-seq-len", "--system-prompt", "--config"],
    "runs": ["DIR", "--json", "--plot", "--out"],
    "serve": ["--base", "--adapter", "--port", "--host", "--max-loaded-adapters", "--api-key", "--config"],
    "embed eval": ["data", "--model", "--baseline", "--split", "--batch-size", "--resamples", "--seed", "--device",
                   "--out", "--config"],
    "embed train": ["config", "overrides", "objective.matryoshka_dims", "eval.select_best", "method.name"],
    "embed pairs": ["data", "--out", "--generator", "--llm", "--chunk-size", "--chunk-overlap", "--round-trip-k",
                    "--test-fraction", "--config"],
    "embed mine": ["data", "--out", "--model", "--num-negatives", "--range-min", "--range-max",
                   "--relative-margin", "--corpus", "--config"],
    "embed demo": ["overrides", "--out"],
}


def subcommands(parser) -> set[str]:
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)


def test_every_subcommand_is_covered_here():
    assert subcommands(build_parser()) == {name.split()[0] for name in FLAGS}


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_exits_0_and_lists_the_flags(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no line wrapping inside a flag name
    with pytest.raises(SystemExit) as exit:
        main([*command.split(), "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    assert all(flag in out for flag in FLAGS[command]), [f for f in FLAGS[command] if f not in out]


def test_help_does_not_import_torch():
    """`tunesmith --help` stays instant: command modules import torch inside the functions that run."""
    code = "import sys; from tunesmith.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def options(*argv):
    return resolve_options(build_parser().parse_args(argv))


def test_defaults_without_file_or_flags():
    assert options("generate", "hi") == GenerateConfig()
    assert options("quantize", "--out", "q") == QuantizeConfig(out="q")


def test_config_file_section_is_read_and_flags_win(tmp_path):
    path = tmp_path / "opts.yaml"
    path.write_text("generate:\n  max_new_tokens: 12\n  system: be brief\n  quantization: none\n"
                    "quantize:\n  out: q8\n  bits: 8\n  double_quant: true\n"
                    "merge:\n  adapter: runs/x/adapter\n  out: merged\n")
    args = build_parser().parse_args(["generate", "--config", str(path), "--max-new-tokens", "5", "hello"])
    assert args.prompt == "hello"
    assert resolve_options(args) == GenerateConfig(max_new_tokens=5, system="be brief", quantization="none")
    assert options("quantize", "--config", str(path), "--no-double-quant") == QuantizeConfig(
        out="q8", bits=8, double_quant=False)
    assert options("merge", "--config", str(path), "--out", "elsewhere") == MergeConfig(
        adapter="runs/x/adapter", out="elsewhere")


def test_chat_reads_its_own_section(tmp_path):
    path = tmp_path / "opts.yaml"
    path.write_text("chat:\n  max_new_tokens: 7\n")
    assert options("chat", "--config", str(path)) == GenerateConfig(max_new_tokens=7)


def test_unknown_key_in_the_file_section_names_key_and_file(tmp_path, capsys):
    path = tmp_path / "opts.yaml"
    path.write_text("generate:\n  max_tokens: 12\n")
    assert main(["generate", "--config", str(path), "hi"]) == 2
    err = capsys.readouterr().err
    assert "'max_tokens'" in err and str(path) in err and "max_new_tokens" in err and "Traceback" not in err


def test_bad_value_names_the_flag_or_the_file_key(tmp_path, capsys):
    path = tmp_path / "opts.yaml"
    path.write_text("quantize:\n  out: q\n  bits: 5\n")
    assert main(["generate", "--max-new-tokens", "0", "hi"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert main(["quantize", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bits in" in err and str(path) in err


def test_missing_required_out_is_a_clear_user_error(tmp_path, capsys):
    assert main(["merge", "--adapter", "runs/x/adapter"]) == 2
    err = capsys.readouterr().err
    assert "--out is required" in err and "`merge:` section" in err and "--adapter is required" not in err
    path = tmp_path / "opts.yaml"
    path.write_text("quantize:\n  bits: 8\n")
    assert main(["quantize", "--config", str(path)]) == 2
    assert "--out is required" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [("merge: [a, b]\n", "must be a mapping"),
                                           ("generate:\n  out: x\n", "no `merge:` section")])
def test_malformed_or_absent_section(tmp_path, capsys, text, message):
    path = tmp_path / "opts.yaml"
    path.write_text(text)
    assert main(["merge", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err
