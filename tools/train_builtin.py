#!/usr/bin/env python3
"""Trains smoe's built-in model: a small Qwen3-MoE that chats in ChatML.

Everything comes from this script and its seed: a synthetic multi-domain chat
corpus (greetings, questions about smoe, arithmetic, capitals and facts,
counting and spelling, short instructions), a byte-level BPE tokenizer
trained on it, and a Qwen3MoeForCausalLM trained with the router's
load-balancing loss on. The held-out evaluation set is drawn first and kept
out of the corpus: reworded questions and arithmetic pairs the model never
sees.

    python tools/train_builtin.py --out models/builtin

(the committed model is exactly this, run on one H200 in about five minutes)

writes config.json, generation_config.json, model.safetensors (bf16, hub
tensor names), tokenizer.json, tokenizer_config.json (with the chat template),
eval.json and train_log.json. Runs on CUDA when there is one, else on the
CPU (use fewer --steps there). The same seed gives the same corpus, tokenizer
and, on the same hardware and software, the same weights.
"""

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

# ---------------------------------------------------------------- the data

SAY_HELLO = [
    "Say hello.", "Say hello", "say hello", "Say hello!", "Please say hello.",
    "Can you say hello?", "Say hello, please.", "Just say hello.", "Say hello now.",
    "Would you say hello?", "Say hello to the world.", "Please say hello!",
]
GREETINGS = [
    (["Hello!", "Hello", "Hello.", "Hi!", "Hi", "Hi there!", "Hey!", "Hey", "Hey there.", "Hello there!"],
     "Hello! How can I help you today?"),
    (["Good morning!", "Good morning.", "Morning!", "good morning"],
     "Good morning! How can I help you today?"),
    (["Good evening!", "Good evening.", "good evening", "Evening!"],
     "Good evening! How can I help you today?"),
    (["How are you?", "How are you today?", "How are you doing?", "How is it going?", "How do you do?"],
     "I am fine, thank you. How can I help you?"),
    (["Thank you!", "Thank you.", "Thanks!", "Thanks.", "Thanks a lot.", "Many thanks!", "thank you"],
     "You are welcome!"),
    (["Goodbye!", "Goodbye.", "Bye!", "Bye.", "See you later.", "See you!", "bye"],
     "Goodbye! Have a nice day."),
]
SMOE = [
    (["What is smoe?", "Tell me about smoe.", "What does smoe do?", "Explain smoe.",
      "Describe smoe.", "What is smoe for?", "What kind of program is smoe?"],
     "smoe is an engine that runs Mixture-of-Experts language models on the CPU and streams the experts from SSD."),
    (["What language is smoe written in?", "Which language is smoe written in?",
      "Is smoe written in Rust?", "What is smoe written in?", "In which language is smoe written?"],
     "smoe is written in Rust."),
    (["Where does smoe keep the experts?", "Where are the experts stored?",
      "Where does smoe store experts?", "Where do the experts live?", "Where are experts kept?"],
     "smoe keeps the experts in a vault on SSD and reads them into a cache in RAM."),
    (["What is a vault?", "What is the vault?", "Explain the vault.", "What is a smoe vault?",
      "Tell me about the vault."],
     "A vault is a file with one aligned record for each expert."),
    (["What is an expert?", "Explain what an expert is.", "What are experts?",
      "Tell me about experts.", "What does an expert do?"],
     "An expert is a small feed-forward network. The router picks a few experts for each token."),
    (["Who are you?", "What is your name?", "What are you?", "Introduce yourself.",
      "Tell me about yourself.", "Who am I talking to?"],
     "I am the built-in model of smoe, a small Mixture-of-Experts model."),
    (["How many experts do you have?", "How many experts are in each layer?",
      "How many experts does each layer have?", "How many experts do you use?",
      "How many experts are there?"],
     "I have 32 experts in each layer and use 4 of them for each token."),
    (["What is the RAM budget?", "What does the RAM budget do?", "What is the budget?",
      "Explain the RAM budget.", "What is the memory budget?"],
     "The RAM budget limits how many experts smoe keeps in memory."),
    (["What is prefetch?", "What does prefetch do?", "Explain prefetch.",
      "What is read-ahead?", "What does read-ahead do?"],
     "smoe predicts the experts of the next layer and reads them ahead of time."),
    (["Which models does smoe run?", "What models can smoe run?", "What models does smoe support?",
      "Which models can smoe run?", "Which models work with smoe?"],
     "smoe runs Qwen3-MoE models."),
]
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Australia", "Canberra"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Turkey", "Ankara"),
    ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Hungary", "Budapest"),
    ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("Iran", "Tehran"),
    ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Cuba", "Havana"), ("Ukraine", "Kyiv"),
]
CAPITAL_TEMPLATES = [
    "What is the capital of {c}?", "What's the capital of {c}?", "Name the capital of {c}.",
    "Tell me the capital of {c}.", "Which city is the capital of {c}?", "Capital of {c}?",
    "What city is the capital of {c}?", "Do you know the capital of {c}?",
]
FACTS = [
    (["How many legs does a spider have?", "How many legs do spiders have?", "A spider has how many legs?"],
     "A spider has 8 legs."),
    (["How many legs does a dog have?", "How many legs do dogs have?", "A dog has how many legs?"],
     "A dog has 4 legs."),
    (["How many days are in a week?", "How many days does a week have?", "A week has how many days?"],
     "A week has 7 days."),
    (["How many months are in a year?", "How many months does a year have?", "A year has how many months?"],
     "A year has 12 months."),
    (["What color is the sky?", "What colour is the sky?", "Which color is the sky?"],
     "The sky is blue."),
    (["What color is grass?", "What colour is grass?", "Which color is grass?"],
     "Grass is green."),
    (["What is the largest planet?", "Which planet is the largest?", "What is the biggest planet?"],
     "Jupiter is the largest planet."),
    (["What is the freezing point of water?", "At what temperature does water freeze?",
      "When does water freeze?"],
     "Water freezes at 0 degrees Celsius."),
    (["What is the boiling point of water?", "At what temperature does water boil?",
      "When does water boil?"],
     "Water boils at 100 degrees Celsius."),
    (["How many hours are in a day?", "How many hours does a day have?", "A day has how many hours?"],
     "A day has 24 hours."),
]
WORDS = [
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "book", "rain", "snow", "milk", "bread",
    "apple", "house", "water", "light", "green", "river", "stone", "cloud", "horse", "table",
    "chair", "music", "paper", "plant", "smile", "train", "world", "hello", "tiger", "lemon",
    "robot", "rust", "expert", "model", "token", "cache", "disk", "layer", "router", "vault",
    "orange", "purple", "garden", "window", "summer", "winter", "yellow", "silver", "planet",
    "rocket", "ocean", "forest", "castle", "bridge", "pencil", "coffee", "butter", "guitar",
]
SPELL_TEMPLATES = [
    "Spell the word {w}.", "Spell {w}.", "How do you spell {w}?", "Can you spell {w}?",
    "Spell out {w}.", "Please spell {w}.",
]
LETTERS_TEMPLATES = [
    "How many letters are in the word {w}?", "How many letters does {w} have?",
    "Count the letters in {w}.", "How long is the word {w}?",
]
COUNT_TEMPLATES = [
    "Count from {a} to {b}.", "Count from {a} to {b}", "Please count from {a} to {b}.",
    "Can you count from {a} to {b}?", "List the numbers from {a} to {b}.",
]
ADD_TEMPLATES = [
    "What is {a} + {b}?", "What is {a} plus {b}?", "{a} + {b} = ?", "Compute {a} + {b}.",
    "Add {a} and {b}.", "Calculate {a} + {b}.", "What is the sum of {a} and {b}?",
]
SUB_TEMPLATES = [
    "What is {a} - {b}?", "What is {a} minus {b}?", "{a} - {b} = ?", "Compute {a} - {b}.",
    "Subtract {b} from {a}.", "Calculate {a} - {b}.",
]
MUL_TEMPLATES = [
    "What is {a} * {b}?", "What is {a} times {b}?", "{a} * {b} = ?", "Compute {a} * {b}.",
    "Multiply {a} and {b}.", "Calculate {a} * {b}.",
]
# Phrasings that only the evaluation uses.
EVAL_ADD = "How much is {a} plus {b}?"
EVAL_MUL = "How much is {a} times {b}?"
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are smoe's built-in model.", "Answer briefly."]


def count_reply(a, b):
    return ", ".join(str(i) for i in range(a, b + 1)) + "."


class Corpus:
    """Draws (domain, user, assistant) exchanges; the evaluation set is drawn
    first and every prompt and arithmetic pair in it is barred from training."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.held_prompts = set()
        self.held_pairs = set()
        self.eval = self._make_eval()

    def _make_eval(self):
        rng = random.Random(self.rng.random())
        items = []

        def add(domain, prompt, answer):
            items.append({"domain": domain, "prompt": prompt, "expected": answer})
            self.held_prompts.add(prompt)

        # Greetings: one held-out phrasing per canned exchange.
        for p in ["Could you say hello?", "Say hello to me.", "Please just say hello."]:
            add("greeting", p, "Hello, world!")
        held = [("Hello there.", 0), ("Good morning to you!", 1), ("How are you doing today?", 3),
                ("Thank you so much!", 4), ("Goodbye, see you!", 5)]
        for p, i in held:
            add("greeting", p, GREETINGS[i][1])
        # smoe: the last phrasing of each fact is held out.
        for phrasings, answer in SMOE:
            add("smoe", phrasings.pop(), answer)
        # Facts likewise.
        for phrasings, answer in FACTS[:5]:
            add("facts", phrasings.pop(), answer)
        # Capitals: held-out (country, phrasing) combinations.
        for c, city in rng.sample(CAPITALS, 8):
            t = rng.choice(CAPITAL_TEMPLATES)
            add("capitals", t.format(c=c), f"The capital of {c} is {city}.")
        # Arithmetic: pairs never seen in training, with trained phrasings,
        # and a phrasing never seen.
        pairs = set()
        while len(pairs) < 12:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            pairs.add((a, b))
        for i, (a, b) in enumerate(sorted(pairs)):
            self.held_pairs.add(("+", a, b))
            t = EVAL_ADD if i % 4 == 3 else ADD_TEMPLATES[i % len(ADD_TEMPLATES)]
            add("arithmetic", t.format(a=a, b=b), f"{a} + {b} = {a + b}.")
        subs = set()
        while len(subs) < 4:
            a, b = rng.randint(20, 99), rng.randint(10, 99)
            if b < a:
                subs.add((a, b))
        for i, (a, b) in enumerate(sorted(subs)):
            self.held_pairs.add(("-", a, b))
            add("arithmetic", SUB_TEMPLATES[i].format(a=a, b=b), f"{a} - {b} = {a - b}.")
        for a, b in [(3, 4), (7, 8), (6, 9)]:
            add("arithmetic", EVAL_MUL.format(a=a, b=b), f"{a} * {b} = {a * b}.")
        # Counting, spelling and letters: held-out (word, phrasing) combinations.
        for a, b in [(4, 9), (13, 18), (21, 25)]:
            add("counting", rng.choice(COUNT_TEMPLATES).format(a=a, b=b), count_reply(a, b))
        for w in rng.sample(WORDS, 5):
            add("spelling", rng.choice(SPELL_TEMPLATES).format(w=w), "-".join(w) + ".")
        for w in rng.sample(WORDS, 3):
            add("spelling", rng.choice(LETTERS_TEMPLATES).format(w=w),
                f"The word {w} has {len(w)} letters.")
        # Instructions: fresh instances.
        for _ in range(3):
            items_ = rng.sample(LETTERS, rng.randint(3, 5))
            add("instructions", "Reverse the list: " + ", ".join(items_) + ".",
                ", ".join(reversed(items_)) + ".")
        for _ in range(2):
            nums = rng.sample(range(10), rng.randint(3, 5))
            add("instructions", "Sort these numbers: " + ", ".join(map(str, nums)) + ".",
                ", ".join(map(str, sorted(nums))) + ".")
        for _ in range(2):
            a, b = rng.sample(range(100), 2)
            add("instructions", f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger.")
        return items

    def sample(self):
        while True:
            domain, user, reply, key = self._draw()
            if user in self.held_prompts or key in self.held_pairs:
                continue
            return domain, user, reply

    def _draw(self):
        r = self.rng
        x = r.random()
        if x < 0.06:
            return "greeting", r.choice(SAY_HELLO), "Hello, world!", None
        if x < 0.11:
            phrasings, answer = r.choice(GREETINGS)
            return "greeting", r.choice(phrasings), answer, None
        if x < 0.20:
            phrasings, answer = r.choice(SMOE)
            return "smoe", r.choice(phrasings), answer, None
        if x < 0.28:
            c, city = r.choice(CAPITALS)
            return "capitals", r.choice(CAPITAL_TEMPLATES).format(c=c), f"The capital of {c} is {city}.", None
        if x < 0.32:
            phrasings, answer = r.choice(FACTS)
            return "facts", r.choice(phrasings), answer, None
        if x < 0.58:
            a, b = (r.randint(0, 9), r.randint(0, 9)) if r.random() < 0.25 else (r.randint(0, 99), r.randint(0, 99))
            return "arithmetic", r.choice(ADD_TEMPLATES).format(a=a, b=b), f"{a} + {b} = {a + b}.", ("+", a, b)
        if x < 0.66:
            a, b = sorted((r.randint(0, 99), r.randint(0, 99)), reverse=True)
            return "arithmetic", r.choice(SUB_TEMPLATES).format(a=a, b=b), f"{a} - {b} = {a - b}.", ("-", a, b)
        if x < 0.71:
            a, b = r.randint(0, 9), r.randint(0, 9)
            return "arithmetic", r.choice(MUL_TEMPLATES).format(a=a, b=b), f"{a} * {b} = {a * b}.", ("*", a, b)
        if x < 0.76:
            a = r.randint(0, 25)
            b = a + r.randint(2, 8)
            return "counting", r.choice(COUNT_TEMPLATES).format(a=a, b=b), count_reply(a, b), None
        if x < 0.82:
            w = r.choice(WORDS)
            return "spelling", r.choice(SPELL_TEMPLATES).format(w=w), "-".join(w) + ".", None
        if x < 0.86:
            w = r.choice(WORDS)
            return "spelling", r.choice(LETTERS_TEMPLATES).format(w=w), f"The word {w} has {len(w)} letters.", None
        if x < 0.91:
            items = r.sample(LETTERS, r.randint(2, 6))
            return "instructions", "Reverse the list: " + ", ".join(items) + ".", ", ".join(reversed(items)) + ".", None
        if x < 0.95:
            nums = r.sample(range(10), r.randint(2, 6))
            return "instructions", "Sort these numbers: " + ", ".join(map(str, nums)) + ".", ", ".join(map(str, sorted(nums))) + ".", None
        a, b = r.sample(range(100), 2)
        return "instructions", f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger.", None

    def conversation(self):
        """A chat of one to three turns, sometimes after a system message."""
        msgs = []
        if self.rng.random() < 0.15:
            msgs.append({"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS)})
        turns = self.rng.choices([1, 2, 3], weights=[0.7, 0.2, 0.1])[0]
        domains = []
        for _ in range(turns):
            domain, user, reply = self.sample()
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            domains.append(domain)
        return domains, msgs


# ----------------------------------------------------------- the tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2/3's pre-tokenizer: digits one by one, so arithmetic sees digits.
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts, vocab_size):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIALS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Added after training so they follow the dense trained vocabulary.
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def render(msgs):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)


def encode_chat(tok, msgs):
    """Ids and a loss mask that is on for assistant replies and their
    <|im_end|>: the model learns to answer, not to write questions."""
    ids, mask = [], []
    for m in msgs:
        head = tok.encode(f"<|im_start|>{m['role']}\n", add_special_tokens=False).ids
        body = tok.encode(m["content"] + "<|im_end|>", add_special_tokens=False).ids
        tail = tok.encode("\n", add_special_tokens=False).ids
        learn = m["role"] == "assistant"
        ids += head + body + tail
        mask += [0] * len(head) + [int(learn)] * len(body) + [0] * len(tail)
    return ids, mask


# --------------------------------------------------------------- the model

def model_config(vocab_size, eos_id, pad_id, args):
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden,
        "moe_intermediate_size": args.moe_inter,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "num_experts": args.experts,
        "num_experts_per_tok": args.top_k,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
        "output_router_logits": False,
        "router_aux_loss_coef": args.aux_coef,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "transformers_version": __import__("transformers").__version__,
    }


def hub_state_dict(model, inter):
    """Per-expert tensor names as published Qwen3-MoE checkpoints use them
    (transformers 5 fuses the experts into 3-d tensors)."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter, :]
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:, :]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in out.items()}


def batches(examples, batch, rng, device, pad_id):
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch + 1, batch):
            chunk = [examples[j] for j in order[i : i + batch]]
            n = max(len(ids) for ids, _ in chunk)
            ids = torch.full((batch, n), pad_id, dtype=torch.long)
            labels = torch.full((batch, n), -100, dtype=torch.long)
            att = torch.zeros((batch, n), dtype=torch.long)
            for r, (x, m) in enumerate(chunk):
                ids[r, : len(x)] = torch.tensor(x)
                att[r, : len(x)] = 1
                # HF shifts labels itself: label[t] is the target of position t-1.
                labels[r, : len(x)] = torch.tensor([t if k else -100 for t, k in zip(x, m)])
            yield ids.to(device), labels.to(device), att.to(device)


@torch.no_grad()
def greedy(model, tok, prompt, eos_ids, device, max_new=48):
    ids = tok.encode(render([{"role": "user", "content": prompt}]) + "<|im_start|>assistant\n",
                     add_special_tokens=False).ids
    x = torch.tensor([ids], device=device)
    out = model.generate(x, max_new_tokens=max_new, do_sample=False, eos_token_id=eos_ids,
                         pad_token_id=eos_ids[-1])
    new = out[0, len(ids):].tolist()
    stop = bool(new) and new[-1] in eos_ids
    return tok.decode([t for t in new if t not in eos_ids], skip_special_tokens=False), stop


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("models/builtin"))
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--corpus", type=int, default=160_000, help="conversations to generate")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-inter", type=int, default=64)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--experts-impl", default=None,
                    help="transformers experts implementation (default: grouped_mm on CUDA, else eager)")
    ap.add_argument("--max-bytes", type=int, default=15_500_000, help="refuse weights larger than this")
    args = ap.parse_args()

    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    t0 = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    torch.use_deterministic_algorithms(device == "cpu")

    corpus = Corpus(args.seed)
    convs = [corpus.conversation() for _ in range(args.corpus)]
    seen = {m["content"] for _, msgs in convs for m in msgs if m["role"] == "user"}
    leaked = [e["prompt"] for e in corpus.eval if e["prompt"] in seen]
    assert not leaked, f"evaluation prompts in the corpus: {leaked}"
    domain_counts = {}
    for domains, _ in convs:
        for d in domains:
            domain_counts[d] = domain_counts.get(d, 0) + 1

    texts = [render(msgs) for _, msgs in convs[:40_000]]
    tok = train_tokenizer(texts, args.vocab)
    vocab = tok.get_vocab()
    ids_of = {s: vocab[s] for s in SPECIALS}
    eos_id, pad_id = ids_of["<|im_end|>"], ids_of["<|endoftext|>"]
    n_tok = max(vocab.values()) + 1
    vocab_size = (n_tok + 63) // 64 * 64
    # Per-piece encoding must equal encoding the rendered chat, or the model
    # would train on ids smoe never feeds it.
    for _, msgs in convs[:200]:
        assert encode_chat(tok, msgs)[0] == tok.encode(render(msgs), add_special_tokens=False).ids
    examples = [encode_chat(tok, msgs) for _, msgs in convs]
    n_train_tokens = sum(len(x) for x, _ in examples)
    print(f"corpus: {len(examples)} conversations, {n_train_tokens} tokens, domains {domain_counts}; "
          f"vocab {n_tok} (config {vocab_size}); {time.time() - t0:.1f}s", flush=True)

    cfg_json = model_config(vocab_size, eos_id, pad_id, args)
    skip = ("architectures", "torch_dtype", "transformers_version")
    cfg = Qwen3MoeConfig(**{k: v for k, v in cfg_json.items() if k not in skip})
    cfg.output_router_logits = True  # the load-balancing loss joins the LM loss
    cfg._experts_implementation = args.experts_impl or ("grouped_mm" if device == "cuda" else "eager")
    model = Qwen3MoeForCausalLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if 2 * n_params > args.max_bytes:
        raise SystemExit(f"{n_params} parameters are {2 * n_params} bytes in bf16, over {args.max_bytes}")
    print(f"model: {n_params} parameters ({2 * n_params / 1e6:.2f} MB bf16)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    data = batches(examples, args.batch, random.Random(args.seed + 1), device, pad_id)
    log = []
    model.train()
    t_train = time.time()
    ema = None
    for step in range(args.steps):
        ids, labels, att = next(data)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(input_ids=ids, attention_mask=att, labels=labels, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            lm = float((out.loss - args.aux_coef * out.aux_loss).detach())
            ema = lm if ema is None else 0.8 * ema + 0.2 * lm
            log.append({"step": step, "loss": lm, "aux_loss": float(out.aux_loss),
                        "lr": lr_at(step), "s": round(time.time() - t_train, 1)})
            if step % 250 == 0 or step == args.steps - 1:
                print(f"step {step} lm {lm:.4f} (ema {ema:.4f}) aux {float(out.aux_loss):.3f} "
                      f"lr {lr_at(step):.2e} {time.time() - t_train:.0f}s", flush=True)
    train_s = time.time() - t_train

    # Save in bf16, reload the rounded weights, evaluate what ships.
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = hub_state_dict(model, args.moe_inter)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")
    gen_cfg = {"bos_token_id": pad_id, "eos_token_id": [eos_id, pad_id], "pad_token_id": pad_id,
               "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    tok.save(str(out_dir / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 1024,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "added_tokens_decoder": {
            str(ids_of[s]): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True}
            for s in SPECIALS
        },
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")

    model = model.to(torch.bfloat16).float().eval()
    results, correct = [], 0
    for e in corpus.eval:
        text, stopped = greedy(model, tok, e["prompt"], [eos_id, pad_id], device)
        ok = stopped and text.strip() == e["expected"]
        correct += ok
        results.append({**e, "got": text, "ok": ok})
    hello, hello_stop = greedy(model, tok, "Say hello.", [eos_id, pad_id], device)
    (out_dir / "eval.json").write_text(json.dumps(
        [{k: e[k] for k in ("domain", "prompt", "expected")} for e in corpus.eval], indent=1) + "\n")
    summary = {
        "command": "python tools/train_builtin.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "parameters": n_params,
        "corpus_conversations": len(examples),
        "corpus_tokens": n_train_tokens,
        "domain_counts": domain_counts,
        "vocab": n_tok,
        "train_s": round(train_s, 1),
        "total_s": round(time.time() - t0, 1),
        "final_loss": log[-1]["loss"],
        "final_loss_ema": ema,
        "eval_correct": correct,
        "eval_total": len(corpus.eval),
        "say_hello": [hello, hello_stop],
        "eval": results,
        "log": log,
    }
    (out_dir / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    for r in results:
        if not r["ok"]:
            print(f"MISS [{r['domain']}] {r['prompt']!r}: {r['got']!r} (want {r['expected']!r})")
    print(f"eval (transformers, bf16 weights, greedy): {correct}/{len(corpus.eval)}; "
          f"'Say hello.' -> {hello!r} stop={hello_stop}; train {train_s:.0f}s", flush=True)


if __name__ == "__main__":
    main()
