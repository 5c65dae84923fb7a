"""Engines for the runtime tests: an engine file's LLMEngine on its own session, and the
byte-level tiny Llama (conftest's byte_model) with a chat template written here (the
tool-calling and Responses API tests)."""

from __future__ import annotations

import json
import shutil

from llmc.build import BuildOptions, build
from llmc.engine_file import EngineFile
from llmc.limits import BuildLimits
from llmc.runtime.engine import LLMEngine
from llmc.runtime.runner import open_session


def open_engine(path, **kw) -> LLMEngine:
    """The engine of an engine file, on a session of its own (kw: LLMEngine's options)."""
    e = EngineFile(path)
    return LLMEngine(open_session(e), e.header, **kw)


# Hermes-style (Qwen2.5's syntax): tools listed in the system turn, calls in <tool_call>
# tags, tool results in <tool_response> tags. `continue` needs jinja2's loopcontrols, which
# transformers enables.
HERMES = """{%- if tools %}<|system|>
{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'You are helpful.' }}

You may call these functions:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call one as <tool_call>
{"name": <name>, "arguments": <arguments>}
</tool_call>
{% elif messages[0]['role'] == 'system' %}<|system|>
{{ messages[0]['content'] }}
{% endif %}
{%- for m in messages %}
{%- if m['role'] == 'system' %}{% continue %}{% endif %}
{%- if m['role'] == 'tool' %}<|tool|>
<tool_response>
{{ m['content'] }}
</tool_response>
{% elif m['role'] == 'assistant' %}<|assistant|>
{{ m['content'] }}
{%- for call in m.get('tool_calls', []) %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{% endfor %}{{ eos_token }}
{% else %}<|{{ m['role'] }}|>
{{ m['content'] }}
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}"""


def engine_with(template: str, byte_model, tmp_path_factory):
    """byte_model with this chat template (room for the tools' prompt: a byte a token)."""
    folder = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(byte_model[0], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config,
                                                              "chat_template": template}))
    out = folder.parent / "tools.engine"
    build(BuildOptions(folder, out, backend="reference", dtype="fp32",
                       limits=BuildLimits(4, 256, 1024, 16)), log=lambda _: None)
    return out
