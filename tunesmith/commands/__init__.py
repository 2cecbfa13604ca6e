"""The subcommands, one module per command family, in the order `tunesmith --help` lists them.

Each module has `register(subparsers)`, which adds its subcommands and binds each to the function
that runs it (`parser.set_defaults(run=...)`); cli.py imports the modules named here and calls it.
A new family (serve, embed) is one module plus one line below. Modules import torch and the
rest of tunesmith inside the functions that run, so `tunesmith --help` stays instant.
"""

MODULES = (
    "tunesmith.commands.train",  # train, demo
    "tunesmith.commands.infer",  # eval, generate, chat
    "tunesmith.commands.score",  # score (reward models)
    "tunesmith.commands.artifacts",  # merge, quantize
    "tunesmith.commands.export",  # export (GGUF)
    "tunesmith.commands.data",  # data demo
    "tunesmith.commands.serve",  # serve (OpenAI-compatible API)
    "tunesmith.commands.runs",  # runs (the run directories side by side)
    "tunesmith.commands.embed",  # embed eval (embedding models for retrieval)
)
