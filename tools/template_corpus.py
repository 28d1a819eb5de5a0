#!/usr/bin/env python3
"""Renders a corpus of real-world chat templates with HF transformers, for smoe's tests.

The templates written for tests (tools/template_refs.py) cannot show how smoe
fares on the templates people actually run. This script takes every template
in llama.cpp's models/templates/ (MIT licensed, from the llama-cpp-python
sdist) plus the published chat_template of each MoE family smoe supports that
is not already among them, renders each over a fixed set of conversations
with transformers' `apply_chat_template(tokenize=False)`, and writes

    fixtures/templates/corpus/*.jinja   the templates (copied as they are)
    fixtures/templates/corpus.json      the conversations and every render

crates/smoe/tests/template.rs reads corpus.json. A render that
transformers refuses (raise_exception, or a Python error such as iterating
None) is kept with its error: smoe passes that case when it refuses too.

`strftime_now` is pinned to SOURCE_DATE_EPOCH (as smoe pins it), so renders
that print today's date are reproducible.

Run from the repository root, with a Python that has transformers and jinja2:

    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python
    tar xzf llama_cpp_python-*.tar.gz
    python tools/template_corpus.py llama_cpp_python-*/vendor/llama.cpp/models/templates \
        [QWEN3_TOKENIZER_DIR]

QWEN3_TOKENIZER_DIR (default ../shared/qwen3-tokenizer) only provides a
tokenizer object to call apply_chat_template on; every case sets its special
tokens itself.
"""

import copy
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import transformers
import transformers.utils.chat_template_utils as chat_template_utils
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from template_refs import CONVERSATIONS, SPECIAL_KEYS, TOOLS, render, set_special_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "templates"
CORPUS = FIXTURES / "corpus"

# 2024-07-26 00:00:00 UTC. smoe reads the same variable.
SOURCE_DATE_EPOCH = 1721952000

# Chat templates of supported MoE families whose template is not in llama.cpp's
# directory, as published in each model's tokenizer_config.json. Qwen3-MoE
# (Qwen3-30B-A3B) has Qwen-Qwen3-0.6B.jinja's template, DeepSeek-V3 is
# represented by deepseek-ai-DeepSeek-V3.1.jinja and Kimi-K2 by
# moonshotai-Kimi-K2.jinja.
FAMILY_TEMPLATES = {
    # Qwen/Qwen1.5-MoE-A2.7B-Chat (qwen2_moe); Qwen2-57B-A14B-Instruct has the same.
    "Qwen-Qwen1.5-MoE-A2.7B-Chat.jinja": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # mistralai/Mixtral-8x7B-Instruct-v0.1 (mixtral), the "v1" template with a
    # system prompt.
    "mistralai-Mixtral-8x7B-Instruct-v0.1.jinja": (
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system_message = messages[0]['content'] %}\n"
        "    {%- set loop_messages = messages[1:] %}\n"
        "{%- else %}\n"
        "    {%- set loop_messages = messages %}\n"
        "{%- endif %}\n"
        "\n"
        "{{- bos_token }}\n"
        "{%- for message in loop_messages %}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
        "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n"
        "    {%- endif %}\n"
        "    {%- if message['role'] == 'user' %}\n"
        "        {%- if loop.first and system_message is defined %}\n"
        "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
        "        {%- else %}\n"
        "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
        "        {%- endif %}\n"
        "    {%- elif message['role'] == 'assistant' %}\n"
        "        {{- ' ' + message['content'] + eos_token}}\n"
        "    {%- else %}\n"
        "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
    ),
    # allenai/OLMoE-1B-7B-0924-Instruct (olmoe), the Tulu template.
    "allenai-OLMoE-1B-7B-0924-Instruct.jinja": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}"
        "{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}"
        "{% if not loop.last %}{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
        "{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
    ),
    # deepseek-ai/DeepSeek-V2-Lite-Chat (deepseek_v2).
    "deepseek-ai-DeepSeek-V2-Lite-Chat.jinja": (
        "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
        "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
        "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
}

# The same special tokens for every template: the renders only need to agree.
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

# (conversation, tools?, add_generation_prompt, extra) rendered with every template.
CASES = [
    ("hello", False, True, {}),
    ("multi", False, True, {}),
    ("multi", False, False, {}),
    ("hello", True, True, {}),
    ("tool_calls", True, True, {}),
    ("tool_calls_content", True, False, {}),
    ("tool_single", True, True, {}),
    ("reasoning", False, False, {"enable_thinking": True}),
    ("reasoning_alias", False, True, {"enable_thinking": False}),
    ("think_inline", False, True, {"enable_thinking": True}),
    ("unicode", False, True, {}),
    ("developer", False, True, {}),
    ("bad_order", False, True, {}),
]


class PinnedDatetime(datetime):
    """What transformers' strftime_now sees as now: SOURCE_DATE_EPOCH in UTC."""

    @classmethod
    def now(cls, tz=None):
        return datetime.fromtimestamp(SOURCE_DATE_EPOCH, timezone.utc).replace(tzinfo=None)


def case_name(template, conversation, tools, agp, extra):
    name = f"{template}/{conversation}"
    if tools:
        name += "+tools"
    if agp:
        name += "+gen"
    for key, value in extra.items():
        name += f"+{key}={value}"
    return name


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    llama_templates = Path(sys.argv[1])
    tokenizer_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT.parent / "shared" / "qwen3-tokenizer"
    chat_template_utils.datetime = PinnedDatetime
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    set_special_tokens(tok, SPECIAL)

    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    CORPUS.mkdir(parents=True)
    for path in sorted(llama_templates.glob("*.jinja")):
        shutil.copyfile(path, CORPUS / path.name)
    for name, source in FAMILY_TEMPLATES.items():
        assert not (CORPUS / name).exists(), name
        (CORPUS / name).write_text(source, encoding="utf-8")

    cases = []
    counts = {"rendered": 0, "raised": 0}
    for path in sorted(CORPUS.glob("*.jinja")):
        # Bytes as the test reads them: read_text would turn \r\n into \n.
        source = path.read_bytes().decode("utf-8")
        for conversation, with_tools, agp, extra in CASES:
            tools = TOOLS if with_tools else None
            case = {
                "name": case_name(path.stem, conversation, with_tools, agp, extra),
                "template_file": path.name,
                "conversation": conversation,
                "tools": with_tools,
                "add_generation_prompt": agp,
                "extra": extra,
            }
            try:
                case["expected"] = render(tok, source, CONVERSATIONS[conversation], tools, agp, extra)
                counts["rendered"] += 1
            except Exception as err:  # noqa: BLE001 - any refusal is a refusal smoe must match
                case["error"] = f"{type(err).__name__}: {err}"
                counts["raised"] += 1
            cases.append(case)

    used = sorted({c for c, *_ in CASES})
    corpus = {
        "source_date_epoch": SOURCE_DATE_EPOCH,
        "special_tokens": {key: SPECIAL.get(key) for key in SPECIAL_KEYS},
        "tools": TOOLS,
        "conversations": {name: CONVERSATIONS[name] for name in used},
        "cases": cases,
    }
    out = FIXTURES / "corpus.json"
    text = json.dumps(corpus, ensure_ascii=False, indent=1) + "\n"
    out.write_text(text, encoding="utf-8")
    templates = len(list(CORPUS.glob("*.jinja")))
    print(
        f"wrote {len(cases)} cases ({counts['rendered']} rendered, {counts['raised']} raised) "
        f"over {templates} templates, {len(text.encode())} bytes, to {out.relative_to(ROOT)} "
        f"(transformers {transformers.__version__}, jinja2 {jinja2.__version__})"
    )


if __name__ == "__main__":
    main()
