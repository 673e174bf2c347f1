"""Reference outputs from transformers (+ PEFT), to check the vLLM paths token for token. Imports torch."""

from __future__ import annotations

from pathlib import Path


def reference_greedy(base: Path, expert: Path, prompt: str, adapter: bool, soft: bool, n: int) -> list[int]:
    """Greedy token ids from transformers (+ PEFT), with the soft prompt prepended as embeddings."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertserve.engine.soft_prompts import load_soft_prompt

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, expert / "adapter")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    embeds = model.get_input_embeddings()(torch.tensor([ids]))
    if soft:
        embeds = torch.cat(
            [load_soft_prompt(expert / "soft_prompts" / "style.safetensors").unsqueeze(0), embeds], 1
        )
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            next_id = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
            out.append(next_id)
            embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[next_id]]))], 1)
    return out


def reference_prompt_logprobs(base: Path, prompt: str) -> tuple[list[int], list[float]]:
    """The prompt's token ids (as the server tokenizes a completion prompt) and the base model's log probability
    of each token after the first, from transformers in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return ids, [float(logprobs[i - 1, t]) for i, t in enumerate(ids) if i > 0]
