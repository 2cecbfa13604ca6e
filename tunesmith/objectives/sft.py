"""Supervised fine-tuning: learn the answers of instruction data, not its prompts.

Rows (alpaca, prompt_completion, messages) are rendered with the model's chat template and only
the assistant turns (with their end-of-turn token) carry labels (data/tokenize.py finds them);
data.train_on_prompt=true labels the prompts too. The loss is lm.py's next-token loss:

    loss = - (1 / |A|) * sum_{t in A} log p(y_t | y_<t),   A = labelled answer tokens of the window
"""

from __future__ import annotations

from tunesmith.data.tokenize import encode_row
from tunesmith.objectives.lm import lm_objective


def encode(fields: dict, fmt: str, tokenizer, cfg) -> dict:
    return encode_row(fields, fmt, tokenizer, cfg.max_seq_len, cfg.train_on_prompt, cfg.system_prompt)


OBJECTIVE = lm_objective("sft", ("alpaca", "prompt_completion", "messages"), encode)
