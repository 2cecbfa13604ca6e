"""An Ollama Modelfile beside an exported GGUF, so `ollama create NAME -f Modelfile` serves it as trained.

Ollama formats a conversation with a Go template, not the Jinja chat template transformers uses, so
the model's template is recognised by what it renders and written in Go's syntax for the families
below; its default system prompt (the text its template adds when a conversation has none, as
SmolLM2's does) becomes SYSTEM, which Ollama puts first in .Messages. The stop token is the one that
ends an assistant turn. Greedy decoding (temperature 0) matches `tunesmith generate` and eval.

    ChatML   <|im_start|>{role}\\n{content}<|im_end|>\\n ...  <|im_start|>assistant\\n   (SmolLM, Qwen)
    Llama 3  <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> ...

A template of another family is left out with a comment: Ollama then falls back on the chat
template stored in the GGUF, which it recognises for common models.
"""

from __future__ import annotations

import re
from pathlib import Path

from tunesmith.files import atomic_write_text

CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
          "<|im_start|>assistant\n")
LLAMA3 = ("<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
          "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
FAMILIES = {  # marker in the rendered prompt -> (Go template, stop token, default system prompt pattern)
    "<|im_start|>": (CHATML, "<|im_end|>", r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n"),
    "<|start_header_id|>": (LLAMA3, "<|eot_id|>",
                            r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"),
}


def modelfile_text(tokenizer, gguf_name: str) -> str:
    lines = ["# Written by tunesmith export. Serve with: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}"]
    family = template_family(tokenizer)
    if family is None:
        lines.append("# The chat template is not one tunesmith writes in Go's syntax (ChatML, Llama 3): Ollama uses "
                     "the template stored in the GGUF.")
    else:
        template, stop, system_pattern = FAMILIES[family]
        lines.append(f'TEMPLATE """{template}"""')
        system = default_system_prompt(tokenizer, system_pattern)
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines.append(f'PARAMETER stop "{stop}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def write_modelfile(tokenizer, gguf_path: Path) -> Path:
    path = gguf_path.parent / "Modelfile"
    atomic_write_text(path, modelfile_text(tokenizer, gguf_path.name))
    return path


def template_family(tokenizer) -> str | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    return next((marker for marker in FAMILIES if marker in text), None)


def default_system_prompt(tokenizer, pattern: str) -> str | None:
    """The system turn the template adds to a conversation that has none, if it adds one."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    found = re.search(pattern, text, flags=re.S)
    return found.group(1) if found else None
