#!/usr/bin/env python3
"""Build the tiny random-weight Llama model that the CPU vLLM engines serve.

Run with the vLLM venv's interpreter (it needs torch, which the project's ``.venv`` does not
have): ``.vllm-venv/bin/python scripts/build_tiny_model.py OUT_DIR``. There is no model hub
here, so the model is made locally: ``LlamaForCausalLM`` with seeded random weights (hidden
128, 2 layers, 4 heads, 2 KV heads -> head size 32, the smallest size CPU attention accepts)
and a vocabulary the size of the project's tiny tokenizer, which is copied into the model
directory together with its chat template so vLLM and the router tokenize identically.

Deterministic: the same seed gives the same weights. The output is gibberish; callers use
``temperature=0`` and ``ignore_eos``. Imports nothing from the project's packages (it runs
in another interpreter); it only reads the tokenizer files from ``simulator/data``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "simulator" / "data" / "tiny-tokenizer"
HIDDEN_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
INTERMEDIATE_SIZE = 256
MAX_POSITION_EMBEDDINGS = 4096


def build(out_dir: Path, seed: int = 0) -> Path:
    """Write config, safetensors weights, tokenizer and chat template into ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Build next to the target and rename, so a half-written directory never looks usable.
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    model.save_pretrained(str(tmp_dir), safe_serialization=True)
    for item in TOKENIZER_DIR.iterdir():
        shutil.copy2(item, tmp_dir / item.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return out_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.out_dir, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
