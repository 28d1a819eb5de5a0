#!/usr/bin/env python3
"""llama.cpp's convert_hf_to_gguf.py with a fallback pre-tokenizer name.

    llama-convert.py LLAMA_DIR PRE [convert_hf_to_gguf.py's arguments...]

The converter names a BPE tokenizer's pre-tokenizer (`tokenizer.ggml.pre`)
by hashing the ids it gives a test string, and refuses a hash it does not
list. smoe's built-in model has its own 1,024-token vocabulary, so its hash
is listed nowhere although its pre-tokenizer is Qwen2's regex. Only where
the converter would refuse does this write PRE instead; a known hash still
wins. vs-llama-logits.sh feeds both engines token ids, so the pre-tokenizer
never touches the logits it compares.
"""
import sys
from pathlib import Path

if len(sys.argv) < 3:
    sys.exit(__doc__)
llama, pre = Path(sys.argv[1]), sys.argv[2]
sys.path[:0] = [str(llama), str(llama / "gguf-py")]
sys.argv = [str(llama / "convert_hf_to_gguf.py")] + sys.argv[3:]

from conversion.base import TextModel  # noqa: E402

known = TextModel.get_vocab_base_pre


def with_fallback(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        print(f"llama-convert.py: writing tokenizer.ggml.pre = {pre!r}", file=sys.stderr)
        return pre


TextModel.get_vocab_base_pre = with_fallback

import convert_hf_to_gguf  # noqa: E402

convert_hf_to_gguf.main()
