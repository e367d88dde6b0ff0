"""The tiny byte-level BPE tokenizer used by tests, the demo, the emulator and the CPU vLLM model.

There is no model hub here, so the project ships its own tokenizer: trained with the
``tokenizers`` library on deterministic generated text, wrapped as a ``PreTrainedTokenizerFast``
with a chat template, and saved under ``simulator/data/tiny-tokenizer``. ``build`` regenerates
it (``scripts/build-tiny-tokenizer``); the saved copy is what everything loads.
"""

from __future__ import annotations

import random
from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "DEFAULT_DIR", "SPECIAL_TOKENS", "build", "default_path"]

DEFAULT_DIR = Path(__file__).parent / "data" / "tiny-tokenizer"
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|start|>", "<|end|>"]

# A Llama-3-like template: role headers, optional tools block, generation prompt. vLLM applies
# it through transformers' apply_chat_template, exactly as the router does.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n"
    "{% endfor %}<|end|>\n{% endif %}"
    "{% for message in messages %}<|start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "him into time has look two more write go see number no way could people my than first water "
    "been call who oil its now find long down day did get come made may part system prompt user "
    "assistant model token cache block router request backend engine prefix decode prefill query "
    "answer document question tenant session agent tool context memory latency throughput GPU"
).split()


def _corpus(seed: int, lines: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(5, 30)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 10_000)))
        out.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":"]))
    return out


def build(path: Path = DEFAULT_DIR, vocab_size: int = 2048, seed: int = 0) -> Path:
    """Train and save the tokenizer; deterministic for a given seed and vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed, 20_000), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=1_000_000,
    )
    fast.chat_template = CHAT_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return path


def default_path() -> Path:
    """The shipped tokenizer directory (loadable with ``AutoTokenizer.from_pretrained``)."""
    return DEFAULT_DIR
