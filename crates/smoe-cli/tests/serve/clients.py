"""The official openai and anthropic clients against `smoe serve`.

Usage: clients.py URL API_KEY MODEL. Checks what a client alone can check
(streamed text equals the whole reply, usage adds up, finish reasons) and
prints one JSON object with what the Rust test compares against smoe's
own reference (`smoe run`, `smoe template --ids`).
"""

import json
import sys

import anthropic
import openai

url, key, model = sys.argv[1:4]
out = {}

oa = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)

out["models"] = [m.id for m in oa.models.list().data]

messages = [{"role": "user", "content": "Tell me a story"}]
whole = oa.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
choice = whole.choices[0]
assert choice.message.role == "assistant"
assert choice.finish_reason in ("stop", "length"), choice.finish_reason
u = whole.usage
assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
out["chat"] = {"content": choice.message.content, "finish_reason": choice.finish_reason}

text, finish, usage = "", None, None
stream = oa.chat.completions.create(
    model=model, messages=messages, max_tokens=24, temperature=0, seed=1,
    stream=True, stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        text += c.delta.content or ""
        finish = c.finish_reason or finish
assert text == choice.message.content, (text, choice.message.content)
assert finish == choice.finish_reason
assert usage is not None and usage.completion_tokens == u.completion_tokens, usage

# A tool-call round trip: the client sends the call the model made and
# its result back; the template must render both.
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
turn = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
    }]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
]
r = oa.chat.completions.create(model=model, messages=turn, tools=tools, tool_choice="auto", max_tokens=2, temperature=0)
out["tool_round_trip"] = {
    "prompt_tokens": r.usage.prompt_tokens,
    "finish_reason": r.choices[0].finish_reason,
    "content": r.choices[0].message.content,
}

comp = oa.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
out["completion"] = comp.choices[0].text

try:
    oa.chat.completions.create(model=model, messages=[], max_tokens=4)
    raise AssertionError("empty messages were accepted")
except openai.BadRequestError as e:
    out["bad_request"] = e.status_code

an = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)
# Newer SDKs have no temperature argument; the field still goes through.
greedy = {"temperature": 0}
msg = an.messages.create(
    model=model, max_tokens=24, extra_body=greedy,
    system="You are terse.",
    messages=[{"role": "user", "content": "Tell me a story"}],
)
assert msg.role == "assistant" and msg.type == "message"
assert msg.stop_reason in ("end_turn", "max_tokens"), msg.stop_reason
whole_text = "".join(b.text for b in msg.content if b.type == "text")
with an.messages.stream(
    model=model, max_tokens=24, extra_body=greedy,
    system="You are terse.",
    messages=[{"role": "user", "content": "Tell me a story"}],
) as s:
    streamed = "".join(s.text_stream)
    final = s.get_final_message()
assert streamed == whole_text, (streamed, whole_text)
assert final.usage.output_tokens == msg.usage.output_tokens
out["anthropic"] = {"text": whole_text, "stop_reason": msg.stop_reason,
                    "input_tokens": msg.usage.input_tokens}

try:
    anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
        model=model, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    raise AssertionError("a wrong key was accepted")
except anthropic.AuthenticationError as e:
    out["wrong_key"] = e.status_code

print(json.dumps(out))
