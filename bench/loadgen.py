#!/usr/bin/env python3
"""Concurrent streaming load on an OpenAI-compatible server (smoe serve or
llama.cpp's llama-server), standard library only: N streams, each sending
ROUNDS streamed chat completions of up to TOKENS tokens one after another.

Prints one JSON object: aggregate decode tok/s (every stream's tokens after
its first, over the time from the first stream's first token to the last
stream's last), time to first token, and the p50/p99 inter-token latency
(gaps between consecutive streamed tokens of one reply).

    bench/loadgen.py --url http://127.0.0.1:8080 --streams 4 --tokens 64
"""

import argparse
import json
import statistics
import threading
import time
import urllib.request

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how a mixture-of-experts model works, step by step.",
    "Describe a journey across the mountains in detail.",
    "List everything you know about the oceans.",
    "Tell me about the history of computing.",
    "Write a poem about rivers, then explain it.",
    "Describe a busy market in a city at dawn.",
    "Explain how bridges are built.",
]


def one_request(url, prompt, tokens, model):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        # llama-server: generate all `tokens` even past an end token, as
        # the synthetic models' replies do anyway; smoe ignores the field.
        "ignore_eos": True,
    }
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    sent = time.perf_counter()
    stamps, usage = [], None
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if choices:
                delta = choices[0].get("delta", {})
                if delta.get("content") or delta.get("reasoning_content"):
                    stamps.append(time.perf_counter())
    n = usage["completion_tokens"] if usage else len(stamps)
    return {"sent": sent, "stamps": stamps, "tokens": n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="bench")
    ap.add_argument("--prompt", help="one prompt for every reply (default: a varied set)")
    ap.add_argument("--label", default="{}", help="JSON fields added to the output")
    a = ap.parse_args()

    results, errors = [], []
    lock = threading.Lock()
    start = threading.Barrier(a.streams)

    def stream(i):
        start.wait()
        for r in range(a.rounds):
            prompt = f"({i}.{r}) " + (a.prompt or PROMPTS[(i + r) % len(PROMPTS)])
            try:
                res = one_request(a.url, prompt, a.tokens, a.model)
            except Exception as e:  # a failed request is reported, not fatal
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                results.append(res)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(a.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    timed = [r for r in results if r["stamps"]]
    gaps = [b - a_ for r in timed for a_, b in zip(r["stamps"], r["stamps"][1:])]
    out = json.loads(a.label)
    out.update({"streams": a.streams, "requests": len(results), "errors": len(errors)})
    if timed:
        first = min(r["stamps"][0] for r in timed)
        last = max(r["stamps"][-1] for r in timed)
        decoded = sum(max(r["tokens"] - 1, 0) for r in timed)
        out["tokens"] = sum(r["tokens"] for r in timed)
        out["agg_tok_s"] = decoded / (last - first) if last > first else 0.0
        out["ttft_ms_p50"] = 1e3 * statistics.median(r["stamps"][0] - r["sent"] for r in timed)
    if len(gaps) >= 2:
        q = statistics.quantiles(gaps, n=100, method="inclusive")
        out["itl_ms_p50"] = 1e3 * statistics.median(gaps)
        out["itl_ms_p99"] = 1e3 * q[98]
    if errors:
        out["first_error"] = errors[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
