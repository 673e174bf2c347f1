"""With LoRA enabled, a step that mixes soft-prompt rows (`prompt_embeds`) with token-id rows kills the engine.

The token embedding is wrapped in a LoRA layer. When one engine step mixes rows given as embeddings with rows given
as token ids, vLLM embeds only the token-id subset, while the LoRA metadata covers the whole batch: on CPU einsum
fails on the shapes and the engine dies ("subscript b has size 22 ... previously seen size 2"); on GPU the same
mismatch is an illegal memory access (vllm-project/vllm#51122, fix proposed in vllm-project/vllm#51123). expertserve's
adapters never adapt the embedding (the manifest's target_modules allows attention and MLP projections only), so
the embedding's LoRA term is zero and the base embedding is the exact result: that is what the patched forward
returns when the sizes disagree.

Remove when: vllm-project/vllm#51123 (or an equivalent fix that embeds the full batch) is in the pinned vLLM.
"""

from __future__ import annotations

from expertserve.engine.vllm_patches.guard import verified

VERIFIED = ("0.32.0",)


def _patch_lora_embedding() -> None:
    from vllm.lora.layers.vocab_parallel_embedding import VocabParallelEmbeddingWithLoRA

    if getattr(VocabParallelEmbeddingWithLoRA.forward, "_expertserve", False):
        return
    original = VocabParallelEmbeddingWithLoRA.forward

    def forward(self, x):  # noqa: ANN001, ANN202 (vLLM's signature)
        mapped = getattr(self.punica_wrapper, "token_lora_indices", None)
        if mapped is not None and mapped.shape[0] != x.numel():
            return self.base_layer.forward(x)
        return original(self, x)

    forward._expertserve = True  # type: ignore[attr-defined]
    VocabParallelEmbeddingWithLoRA.forward = forward


def apply() -> None:
    """Installs the patch (once) after checking the installed vLLM."""
    verified("lora_embedding", VERIFIED)
    _patch_lora_embedding()
