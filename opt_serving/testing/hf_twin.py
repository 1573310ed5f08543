"""The same weights in Hugging Face transformers' ``OPTForCausalLM`` (tests and benchmarks).

transformers is an independent OPT implementation that nobody here wrote: the test suite
compares our logits and greedy decoding with it, and ``scripts/bench_serve.py`` our decode
speed. It is a test-only dependency, imported here on first use.
"""

from __future__ import annotations

from ..model import OPTModel
from ..split_rules import is_buffer, separate_names, unfuse_kvq


def hf_twin(model: OPTModel):
    """An ``OPTForCausalLM`` holding ``model``'s weights (fused [K; V; Q] -> k/v/q_proj)."""
    import transformers

    cfg = model.cfg
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers,
        ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions, do_layer_norm_before=True,
        word_embed_proj_dim=cfg.embed_dim, dropout=0.0, attention_dropout=0.0,
        activation_function="relu", pad_token_id=1, bos_token_id=2, eos_token_id=2)).eval()
    state = {}
    for name, t in model.state_dict().items():
        if is_buffer(name):
            continue
        if "qkv_proj" in name:
            for sub, piece in zip(separate_names(name), unfuse_kvq(t)):
                state["model." + sub] = piece
        else:
            state["model." + name.replace("decoder.layer_norm", "decoder.final_layer_norm")] = t
    state["lm_head.weight"] = model.state_dict()["decoder.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    return hf
