"""BlenderBot 1 (ParlAI's encoder-decoder ``transformer/generator``): ``config`` (shapes and
presets), ``model`` (the network in ParlAI's parameter names), ``hf`` (Hugging Face weights in
those names), ``parlai`` (ParlAI's own model files, dictionary and history vector) and
``search`` (ParlAI's TreeSearch: beam and greedy, exactly). The 90M's subword BPE, the
engine's cached decoding and the serving and chat interfaces are still to come (issue 20)."""
