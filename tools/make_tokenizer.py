#!/usr/bin/env python3
"""Builds the small Qwen3-style fixture tokenizer in fixtures/tokenizer/.

The real Qwen3 tokenizer.json is 11 MB; tests need the same machinery
(NFC normaliser, the Split regex + ByteLevel pre-tokeniser, ByteLevel
decoder and post-processor, the Qwen3 added tokens and chat template) but not
its 151k-entry vocabulary. So this script copies every setting from the real
files verbatim, trains a byte-level BPE of about 400 tokens on a small
built-in corpus, and appends the Qwen3 added tokens right after the trained
vocabulary with the same contents and flags.

Usage: python tools/make_tokenizer.py [--real DIR] [--out DIR]
Needs `tokenizers` and `transformers` (for the verification at the end).
"""

import argparse
import json
import pathlib
import sys

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

ROOT = pathlib.Path(__file__).resolve().parent.parent
VOCAB_SIZE = 400  # including the 256-symbol byte alphabet

# English, German, Chinese and code, so that merges exist for each script and
# multi-byte characters appear both merged and split into byte tokens.
CORPUS = """
Say hello. Hello, world! Hello there, how are you today?
You are a helpful assistant. The user asks a question and the assistant answers.
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.
Mixture-of-experts models route every token to a few experts out of many.
Each expert is a small feed-forward network; the router picks the top experts.
Tokens are sampled with temperature, top-k, top-p and min-p filtering.
I think, therefore I am. Let me think about this step by step.
What is the capital of France? The capital of France is Paris.
Please write a short poem about the sea and the wind.
Guten Morgen! Wie geht es dir heute? Mir geht es gut, danke.
Die Straße ist nass, weil es regnet. Wir gehen über die Brücke.
Schöne Grüße aus München. Das Mädchen isst einen Apfel und trinkt Saft.
Ich möchte ein Glas Wasser, bitte. Die Größe der Tür ist ungewöhnlich.
Fünf Bären überqueren den Fluss. Äpfel, Öl und Übung machen den Meister.
你好，世界！今天天气很好。我们一起去公园散步吧。
我是一个有用的助手。请问你有什么问题？
人工智能模型可以回答问题，也可以写代码。
中国的首都是北京。上海是一个很大的城市。
我喜欢学习中文，也喜欢学习编程。谢谢你的帮助！
def hello(name):
    return f"Hello, {name}!"

for i in range(10):
    print(hello(str(i)))

fn main() {
    let x: u32 = 42;
    println!("hello {x}");
    if x > 0 { return; }
}

class Expert(nn.Module):
    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))

{"role": "user", "content": "Say hello."}
"""

# Checked against the real tokenizer: the pre-tokeniser must split these
# exactly as Qwen3's does.
PRE_TOKENIZE_SAMPLES = [
    "Say hello.",
    "Schöne Grüße, I'm here!\n\n  def f(x):\n\treturn 42",
    "你好，世界！ 🙂 12345 don't",
]


def train(real: dict) -> dict:
    """Trains the BPE model with the real pre-tokeniser and returns its JSON."""
    split = real["pre_tokenizer"]["pretokenizers"][0]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split["pattern"]["Regex"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    return json.loads(tok.to_str())["model"]


def build(real: dict) -> dict:
    trained = train(real)
    # Qwen's vocabulary is dense; the added tokens must follow the trained one.
    n = len(trained["vocab"])
    assert sorted(trained["vocab"].values()) == list(range(n)), "trained vocab is not dense"
    added = [{**token, "id": n + i} for i, token in enumerate(real["added_tokens"])]
    # Same BPE options as the real model, in the same order; only the
    # vocabulary and merges are ours.
    options = {k: v for k, v in real["model"].items() if k not in ("vocab", "merges")}
    return {
        "version": real["version"],
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": real["normalizer"],
        "pre_tokenizer": real["pre_tokenizer"],
        "post_processor": real["post_processor"],
        "decoder": real["decoder"],
        "model": {**options, "vocab": trained["vocab"], "merges": trained["merges"]},
    }


def build_config(real_config: dict, added: list) -> dict:
    config = {k: v for k, v in real_config.items() if k != "chat_template"}
    config["added_tokens_decoder"] = {
        str(t["id"]): {
            "content": t["content"],
            "lstrip": t["lstrip"],
            "normalized": t["normalized"],
            "rstrip": t["rstrip"],
            "single_word": t["single_word"],
            "special": t["special"],
        }
        for t in added
    }
    config["bos_token"] = None
    config["eos_token"] = "<|im_end|>"
    config["pad_token"] = "<|endoftext|>"
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config.setdefault("model_max_length", 131072)
    config["chat_template"] = real_config["chat_template"]
    return config


def verify(out: pathlib.Path, real_dir: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    fixture = AutoTokenizer.from_pretrained(str(out))
    real = AutoTokenizer.from_pretrained(str(real_dir))
    for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        ids = fixture.encode(name, add_special_tokens=False)
        assert ids == [fixture.convert_tokens_to_ids(name)], (name, ids)
    assert fixture.eos_token == "<|im_end|>" and fixture.pad_token == "<|endoftext|>"
    assert fixture.bos_token is None

    messages = [{"role": "user", "content": "Say hello."}]
    rendered = fixture.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    assert rendered == expected, repr(rendered)
    assert rendered == real.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    chat_ids = fixture.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if not isinstance(chat_ids, list):  # transformers 5 returns a BatchEncoding
        chat_ids = chat_ids["input_ids"]
    assert chat_ids == fixture.encode(rendered, add_special_tokens=False)
    assert fixture.decode(chat_ids) == expected

    pre_fixture = fixture.backend_tokenizer.pre_tokenizer
    pre_real = real.backend_tokenizer.pre_tokenizer
    for text in PRE_TOKENIZE_SAMPLES + CORPUS.splitlines():
        assert pre_fixture.pre_tokenize_str(text) == pre_real.pre_tokenize_str(text), text
        ids = fixture.encode(text, add_special_tokens=False)
        assert fixture.decode(ids) == text, text
    print("rendered:", repr(rendered))
    print("chat ids:", chat_ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--real",
        type=pathlib.Path,
        default=ROOT.parent / "shared/qwen3-tokenizer",
        help="directory with Qwen3's tokenizer.json and tokenizer_config.json",
    )
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "fixtures/tokenizer")
    args = parser.parse_args()

    real = json.loads((args.real / "tokenizer.json").read_text(encoding="utf-8"))
    real_config = json.loads((args.real / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer = build(real)
    config = build_config(real_config, tokenizer["added_tokens"])

    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in (("tokenizer.json", tokenizer), ("tokenizer_config.json", config)):
        text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / name} ({len(text.encode())} bytes)")

    verify(args.out, args.real)
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        print(f"{name} = {ids[name]}")
    print(f"trained vocab: {len(tokenizer['model']['vocab'])}")
    print(f"vocab size (max id + 1): {max(ids.values()) + 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
