"""Model families: the capture scores with each family's own attention (its implementation, scaling,
softcapping, sinks, sliding windows, QK-norm), on tiny random models built from their configs."""

from __future__ import annotations

import pytest
import torch
from tiny import make_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from draftkv.attention import WindowCollector, capture
from draftkv.cache import compressed_layers

TOKENIZER = make_tokenizer()
# Per family, what makes its attention its own (sliding windows shorter than the prompt).
FAMILIES = {
    "llama": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "qwen2": {},
    "qwen3": {},  # QK-norm
    "mistral": {"sliding_window": 16},
    "gemma2": {"sliding_window": 16, "attn_logit_softcapping": 5.0, "query_pre_attn_scalar": 24},
    "gemma3_text": {"sliding_window": 16, "query_pre_attn_scalar": 24},
    "phi3": {},
    "olmo2": {},
    "granite": {"attention_multiplier": 0.3},
    "smollm3": {},
    "cohere2": {"sliding_window": 16},
    "gpt_oss": {"sliding_window": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
}


def tiny_model(family: str, implementation: str) -> torch.nn.Module:
    config = AutoConfig.for_model(
        family, vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        initializer_range=0.2, tie_word_embeddings=True, eos_token_id=TOKENIZER.eos_token_id,
        pad_token_id=TOKENIZER.pad_token_id, bos_token_id=None, **FAMILIES[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    with torch.no_grad():  # sinks start at zero: make them matter
        for name, parameter in model.named_parameters():
            if name.endswith("sinks"):
                parameter.normal_(0, 2)
    return model.eval().requires_grad_(False)


IMPLEMENTATIONS = [(family, "eager") for family in FAMILIES] + [
    (family, "sdpa") for family in FAMILIES if family not in ("gemma2", "gpt_oss")]  # sdpa cannot softcap or sink


@pytest.mark.parametrize(("family", "implementation"), IMPLEMENTATIONS)
def test_captured_window_probabilities_are_the_models_own_attention(family, implementation):
    """Per layer, the window queries' captured scores equal the model's own eager attention weights
    (output_attentions): max over the query heads of each KV group and the window queries. With sinks
    (GPT-OSS) the sink's share is left out and the rest renormalised over the real keys. Sliding-window
    layers keep their window, so they are not scored."""
    n, window = 40, 8
    ids = torch.randint(3, len(TOKENIZER), (1, n), generator=torch.Generator().manual_seed(1))
    reference = tiny_model(family, "eager")
    with torch.inference_mode():
        attentions = reference(input_ids=ids, output_attentions=True).attentions
    model = tiny_model(family, implementation)
    collector = WindowCollector(n - window, "max")
    collector.score_last(window)
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with capture(model, collector):
            captured = model(input_ids=ids).logits
    assert torch.equal(captured, plain)  # the model ran its own attention, exactly
    assert model.config._attn_implementation == implementation  # and was switched back
    scores = collector.layer_scores()
    full = compressed_layers(DynamicCache(config=model.config))  # sliding windows are not scored
    assert len(scores) == len(full) and len(attentions) == 4
    for layer, got in zip(full, scores, strict=True):
        weights = attentions[layer]
        rows = weights[:, :, -window:].float()
        rows = rows / rows.sum(dim=-1, keepdim=True)  # no-op but for sinks
        expected = rows[..., : n - window].reshape(1, 2, 2, window, n - window).amax(dim=(2, 3))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=f"{family} layer {layer}")
