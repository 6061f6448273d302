"""Chat templates: mergekit's built-in names, ``auto``, a model's template, or Jinja text.

The five names mergekit accepts map to Jinja templates written here for the formats
those model families use (rendered strings are pinned in tests/test_vocab.py):

* ``chatml``: ``<|im_start|>ROLE\\nTEXT<|im_end|>\\n`` per message; prompt ``<|im_start|>assistant\\n``.
* ``llama3``: ``BOS`` then ``<|start_header_id|>ROLE<|end_header_id|>\\n\\nTEXT<|eot_id|>`` per message
  (text trimmed); prompt ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``.
* ``mistral``: ``BOS[INST] TEXT [/INST] ANSWER EOS``..., an optional system message
  joined to the first user turn with a blank line; roles must alternate.
* ``alpaca``: the optional system text, then ``### Instruction:\\nTEXT`` /
  ``### Input:\\nTEXT`` (role ``user_context``) / ``### Response:\\nTEXT`` blocks separated by
  blank lines; prompt ``### Response:\\n``.
* ``exaone``: ``[|system|]TEXT[|endofturn|]\\n`` (an empty system turn when none is given),
  ``[|user|]TEXT\\n``, ``[|assistant|]TEXT[|endofturn|]\\n``; prompt ``[|assistant|]``.

mergekit's own files for these names render stray whitespace (an extra newline after
each Llama 3 turn, indentation in EXAONE's, no blank line before Alpaca's prompt);
these render the formats themselves.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from alloykit.errors import RecipeError, did_you_mean

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

MISTRAL = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('mistral chat template: after an optional system message, roles must alternate user/assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system is not none %}{{ '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

ALPACA = (
    "{% set headers = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} %}"
    "{% set ns = namespace(first=true) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set block = message['content'] | trim %}"
    "{% elif message['role'] in headers %}{% set block = headers[message['role']] + '\\n' + (message['content'] | trim) %}"
    "{% else %}{{ raise_exception('alpaca chat template: roles are system, user, user_context and assistant') }}{% endif %}"
    "{% if not ns.first %}{{ '\\n\\n' }}{% endif %}{{ block }}{% set ns.first = false %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if not ns.first %}{{ '\\n\\n' }}{% endif %}{{ '### Response:\\n' }}{% endif %}"
)

EXAONE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

TEMPLATES = {"alpaca": ALPACA, "chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "exaone": EXAONE}


def folder_template(folder: Path) -> str | None:
    """The chat template stored with a tokenizer: ``chat_template.jinja``, else
    ``chat_template.json``, else ``tokenizer_config.json``'s (its ``default`` when named)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, list):  # [{name, template}, ...]
            value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(value, str) and value:
            return value
    return None


def resolve_chat_template(value: str | None, model_folders: dict[str, Path | None]) -> str | None:
    """The Jinja text for a recipe's ``chat_template`` (None: keep the tokenizer's own).

    ``model_folders``: the recipe's model references (in recipe order) -> their folders.
    """
    if value is None:
        return None
    if value == "auto":  # mergekit: the template most of the inputs use (first seen wins a tie)
        found = [t.strip() for f in model_folders.values() if f is not None and (t := folder_template(f))]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in TEMPLATES:
        return TEMPLATES[value]
    if value in model_folders or (len(value) < 1024 and "{" not in value and Path(value).is_dir()):
        folder = model_folders.get(value) or Path(value)
        tmpl = folder_template(folder) if folder is not None else None
        if tmpl is None:
            raise RecipeError(f"chat_template '{value}': that model has no chat template (chat_template.jinja or "
                              "tokenizer_config.json); name one of " + ", ".join(TEMPLATES) + ", or give Jinja text")
        return tmpl
    if "{" not in value:
        raise RecipeError(f"chat_template '{value}' is neither a template name ({', '.join(TEMPLATES)}, auto), a model "
                          f"folder, nor Jinja text{did_you_mean(value, [*TEMPLATES, 'auto'])}")
    return value
