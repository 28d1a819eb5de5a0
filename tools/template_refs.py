#!/usr/bin/env python3
"""Writes the reference renders that smoe's chat-template tests compare against.

smoe must render chat templates byte for byte like HF transformers'
`apply_chat_template(..., tokenize=False)`. This script runs transformers itself
on the templates in fixtures/templates/ and a set of conversations, and writes
fixtures/templates/cases.json, which crates/smoe/tests/template.rs reads.

The *.jinja templates there were written for the tests, in the styles of
popular model families. This script also writes two: qwen3.jinja, copied from
the Qwen3 tokenizer config, and chatml_crlf.jinja, chatml_tools.jinja with
Windows line endings.

Run from the repository root, with a Python that has transformers and jinja2:

    /root/venv-ref/bin/python tools/template_refs.py [QWEN3_TOKENIZER_DIR]

QWEN3_TOKENIZER_DIR defaults to ../shared/qwen3-tokenizer. Only its tokenizer
is loaded (to call apply_chat_template on), and its template copied.
"""

import copy
import json
import sys
from datetime import datetime
from pathlib import Path

import jinja2
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "templates"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# The Llama-style template prints today's date through strftime_now unless
# date_string is passed; the test swaps in its own "today" for this value.
DATE_FORMAT = "%d %b %Y"

# ---------------------------------------------------------------- tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": 'City name, e.g. "Zürich"'},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            },
            "required": ["city"],
        },
    },
}

SEARCH = {
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "Search the docs <index> & return hits.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for"},
                "limit": {"type": "integer", "default": 5},
                "threshold": {"type": "number", "default": 1e-05},
                "weight": {"type": "number", "default": 0.5},
                "tags": {"type": "array", "items": {"type": "string"}},
                "exact": {"type": ["boolean", "null"]},
                "filters": {"type": "object", "properties": {"lang": {"type": "string"}}, "required": ["lang"]},
            },
            "required": ["query"],
        },
        "return": {"type": "array"},
    },
}

TOOLS = [WEATHER, SEARCH]

# -------------------------------------------------------- conversations


def call(id_, name, arguments):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS = {
    "hello": [{"role": "user", "content": "Hello!"}],
    "multi": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    # Two parallel calls, one with dict arguments and one with a JSON string
    # (as OpenAI clients send them), content null (dropped by transformers).
    "tool_calls": [
        {"role": "system", "content": "You can use tools."},
        {"role": "user", "content": 'Weather in Zürich, and docs about "streams"?'},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                call("abcDEF123", "get_weather", {"city": "Zürich", "unit": "celsius"}),
                call("xyz987ABC", "search_docs", '{"query": "streams", "limit": 3}'),
            ],
        },
        {"role": "tool", "tool_call_id": "abcDEF123", "name": "get_weather", "content": '{"temp_c": 21.5, "sky": "clear"}'},
        {"role": "tool", "tool_call_id": "xyz987ABC", "name": "search_docs", "content": "No results."},
        {"role": "assistant", "content": "It is 21.5 °C and clear; the docs have nothing on streams."},
        {"role": "user", "content": "Thanks!"},
    ],
    # One call, and a tool result that is an object rather than a string.
    "tool_single": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [call("call12345", "get_weather", {"city": "Paris", "unit": "celsius"})]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": {"temp_c": 18, "windy": True, "note": None, "ratio": 0.25}},
    ],
    "reasoning": [
        {"role": "user", "content": "Is 97 prime?"},
        {"role": "assistant", "reasoning_content": "Check 2, 3, 5, 7: none divide 97.", "content": "Yes, 97 is prime."},
        {"role": "user", "content": "And 91?"},
        {"role": "assistant", "reasoning_content": "\n91 = 7 * 13.\n", "content": "\nNo: 91 = 7 × 13."},
    ],
    # Older names for the reasoning field, which transformers aliases.
    "reasoning_alias": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning": "The user greets me.", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "thinking": "They are leaving.", "content": "Goodbye!", "reasoning_content": None},
    ],
    "think_inline": [
        {"role": "user", "content": "Solve x+1=2."},
        {"role": "assistant", "content": "<think>\nSubtract 1 from both sides.\n</think>\n\nx = 1"},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "<think>\nA polite reply.\n</think>\n\nYou're welcome!"},
    ],
    "unicode": [
        {"role": "system", "content": "Grüße, 你好, 🙂"},
        {"role": "user", "content": "Quote: \"double\" 'single' back\\slash <tag> & amp;\ttab"},
        {"role": "assistant", "content": "Sure — \"ok\" \\ <b>&amp;</b> it's done 🙂"},
        {"role": "user", "content": "Next\nline ünïcödé"},
    ],
    "developer": [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "How are you?"},
    ],
    "bad_order": [
        {"role": "user", "content": "First"},
        {"role": "user", "content": "Second"},
    ],
    "bad_tool_id": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [call("short", "get_weather", {"city": "Oslo"})]},
    ],
    "probe": [
        {"role": "user", "content": "  Hello, World! Grüße 你好 🙂 *  "},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "bye"},
    ],
}

# Qwen3's own template reads the content of tool-calling turns, so it needs one.
CONVERSATIONS["tool_calls_content"] = copy.deepcopy(CONVERSATIONS["tool_calls"])
CONVERSATIONS["tool_calls_content"][2]["content"] = "Let me check."

PROBE = {
    "name": "Zoë 🙂",
    "n": 3,
    "f": 0.5,
    "t": True,
    "nul": None,
    "tiny": 1e-05,
    "big": 1e20,
    "whole": 2.0,
    "list": [1, 2.5, "s", None, True, "é"],
    "nested": {"b": {"x": [1e-05, 1e20, -0.0]}, "a": {"k": "v", "n": 7}},
    "quote": "it's \"q\" <&> \\ é\u0007\u00a0",
}

# ----------------------------------------------------------- templates

SPECIAL = {
    "chatml_crlf": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "chatml_tools": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "qwen3": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "deepseek": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    "harmony": {"eos_token": "<|return|>", "pad_token": "<|endoftext|>"},
    "pycompat": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
}

DATE = {"date_string": "26 Jul 2024"}

# (template, conversation, tools?, add_generation_prompt, extra, raises)
CASES = [
    ("chatml_tools", "hello", False, True, {}, False),
    ("chatml_tools", "multi", False, True, {}, False),
    ("chatml_tools", "multi", False, False, {}, False),
    ("chatml_tools", "tool_calls", True, True, {}, False),
    ("chatml_tools", "tool_single", True, True, {}, False),
    ("chatml_tools", "reasoning", False, False, {}, False),
    ("chatml_tools", "reasoning_alias", False, True, {"enable_thinking": False}, False),
    ("chatml_tools", "think_inline", False, False, {}, False),
    ("chatml_tools", "unicode", False, True, {"enable_thinking": True}, False),
    ("chatml_tools", "hello", True, True, {"enable_thinking": False}, False),
    ("chatml_crlf", "tool_calls", True, True, {}, False),
    ("qwen3", "hello", False, True, {}, False),
    ("qwen3", "multi", False, True, {"enable_thinking": False}, False),
    ("qwen3", "tool_calls_content", True, True, {}, False),
    ("qwen3", "reasoning", False, False, {}, False),
    ("qwen3", "think_inline", False, False, {}, False),
    ("qwen3", "unicode", False, True, {}, False),
    ("llama3", "hello", False, True, {}, False),
    ("llama3", "multi", False, True, DATE, False),
    ("llama3", "tool_single", True, True, DATE, False),
    ("llama3", "tool_single", True, False, {**DATE, "tools_in_user_message": False}, False),
    ("llama3", "unicode", False, False, {**DATE, "bos_token": "[bos override]"}, False),
    ("mistral", "hello", False, False, {}, False),
    ("mistral", "multi", False, False, {}, False),
    ("mistral", "tool_calls", True, False, {}, False),
    ("mistral", "tool_single", True, False, {}, False),
    ("mistral", "unicode", False, False, {}, False),
    ("mistral", "bad_order", False, False, {}, True),
    ("mistral", "bad_tool_id", True, False, {}, True),
    ("deepseek", "hello", False, True, {}, False),
    ("deepseek", "multi", False, True, {}, False),
    ("deepseek", "tool_calls", True, True, {}, False),
    ("deepseek", "think_inline", False, False, {}, False),
    ("deepseek", "unicode", False, True, {}, False),
    ("harmony", "hello", False, True, {}, False),
    ("harmony", "developer", True, True, {**DATE, "reasoning_effort": "high"}, False),
    ("harmony", "tool_calls", True, False, {}, False),
    ("harmony", "tool_single", True, True, {}, False),
    ("harmony", "reasoning", False, False, {}, False),
    ("harmony", "reasoning_alias", False, True, {}, False),
    ("harmony", "unicode", False, False, {}, False),
    ("pycompat", "probe", False, True, {"probe": PROBE}, False),
    ("pycompat", "multi", False, False, {"probe": PROBE}, False),
]


def set_special_tokens(tok, special):
    for key in SPECIAL_KEYS:
        setattr(tok, key, special.get(key))
    # The test hands these to smoe as its special tokens, so they must be
    # exactly what transformers passes to the template.
    assert tok.special_tokens_map == special, (tok.special_tokens_map, special)


def render(tok, source, messages, tools, add_generation_prompt, extra):
    return tok.apply_chat_template(
        copy.deepcopy(messages),
        tools=copy.deepcopy(tools),
        chat_template=source,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **copy.deepcopy(extra),
    )


def main():
    tokenizer_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "qwen3-tokenizer"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    qwen3 = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    (FIXTURES / "qwen3.jinja").write_text(qwen3, encoding="utf-8")
    # jinja2 reads \r\n and \r as \n, in text and string literals alike.
    chatml = (FIXTURES / "chatml_tools.jinja").read_text(encoding="utf-8")
    (FIXTURES / "chatml_crlf.jinja").write_bytes(chatml.replace("\n", "\r\n").encode())

    cases = []
    names = set()
    for template, conversation, with_tools, agp, extra, raises in CASES:
        name = f"{template}/{conversation}"
        if with_tools:
            name += "+tools"
        name += "+gen" if agp else ""
        for key, value in extra.items():
            if key != "probe":
                name += f"+{key}={value}"
        assert name not in names, name
        names.add(name)

        template_file = f"{template}.jinja"
        # Bytes as the test reads them: read_text would turn \r\n into \n.
        source = (FIXTURES / template_file).read_bytes().decode("utf-8")
        special = SPECIAL[template]
        set_special_tokens(tok, special)
        messages = CONVERSATIONS[conversation]
        tools = TOOLS if with_tools else None
        case = {
            "name": name,
            "template_file": template_file,
            "messages": messages,
        }
        if tools is not None:
            case["tools"] = tools
        case["add_generation_prompt"] = agp
        case["extra"] = extra
        case["special_tokens"] = {key: special.get(key) for key in SPECIAL_KEYS}

        before = datetime.now().strftime(DATE_FORMAT)
        try:
            rendered = render(tok, source, messages, tools, agp, extra)
        except jinja2.exceptions.TemplateError as err:
            assert raises, f"{name}: unexpected template error: {err}"
            case["error"] = str(err)
        else:
            assert not raises, f"{name}: expected the template to raise"
            case["expected"] = rendered
            today = datetime.now().strftime(DATE_FORMAT)
            if "date_string" not in extra and "Today Date: " + today in rendered:
                assert today == before, "the date changed while rendering; run again"
                case["strftime"] = {"format": DATE_FORMAT, "rendered": today}
        cases.append(case)

    out = FIXTURES / "cases.json"
    text = json.dumps(cases, ensure_ascii=False, indent=1) + "\n"
    out.write_text(text, encoding="utf-8")
    print(
        f"wrote {len(cases)} cases, {len(text.encode())} bytes, to {out.relative_to(ROOT)} "
        f"(transformers {transformers.__version__}, jinja2 {jinja2.__version__})"
    )


if __name__ == "__main__":
    main()
