"""Causal language modelling: learn every token, self-supervised.

Raw text rows are trained on every token (a BOS first, an EOS appended so documents end).
Instruction rows are rendered with the model's chat template and trained on every token of the
rendering, system and user turns included (continued pre-training on conversations); use sft to
learn only the answers. The loss is lm.py's next-token loss over all positions but the first:

    loss = - (1 / |T|) * sum_{t in T} log p(y_t | y_<t),   T = every token of the window after the first
"""

from __future__ import annotations

from tunesmith.data.tokenize import encode_row
from tunesmith.objectives.lm import lm_objective


def encode(fields: dict, fmt: str, tokenizer, cfg) -> dict:
    return encode_row(fields, fmt, tokenizer, cfg.max_seq_len, train_on_prompt=True, system_prompt=cfg.system_prompt)


OBJECTIVE = lm_objective("causal_lm", ("text", "alpaca", "prompt_completion", "messages"), encode)
