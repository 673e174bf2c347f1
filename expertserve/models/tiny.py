"""Tiny random causal LMs for fast, token-exact tests of training and serving.

The model is a real transformers Llama (or Qwen2) with a few layers and a small byte-level BPE tokenizer
trained here on a built-in corpus, with a ChatML chat template. Its head size is one vLLM's CPU attention
backend accepts. Random weights give arbitrary but deterministic text: enough to compare engines token
for token, not to judge quality.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Head sizes vLLM's CPU attention backend supports.
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

_CORPUS = """
The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital.
SELECT name, age FROM users WHERE age > 30 ORDER BY name LIMIT 10; SELECT COUNT(*) FROM orders GROUP BY city;
{"name": "Alice", "age": 34, "email": "alice@example.com", "tags": ["a", "b"], "active": true, "score": 1.5}
function add(a: number, b: number): number { return a + b; } const xs: string[] = []; interface User { id: string }
Extract the fields from the text into JSON. Write a TypeScript function. Write a SQL query for the table.
0 1 2 3 4 5 6 7 8 9 10 100 1000 hello world yes no true false null, . ; : ( ) [ ] { } < > = + - * /
"""


def build_tiny_model(
    out_dir: str | Path,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Writes a tiny random model with its tokenizer to `out_dir`; returns the directory.

    Raises:
        ValueError: A size vLLM's CPU backend would refuse (head size) or an unknown architecture.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    head_dim = hidden_size // heads
    if hidden_size % heads or head_dim not in CPU_HEAD_DIMS:
        raise ValueError(
            f"hidden_size / heads = {hidden_size / heads}; vLLM on CPU needs one of {CPU_HEAD_DIMS}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    if arch == "llama":
        config = LlamaConfig(head_dim=head_dim, **common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    else:
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    (out / "expertserve-tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}) + "\n")
    return out
