"""BlenderBot 1 (ParlAI's encoder-decoder ``transformer/generator``): ``config`` (shapes and
presets), ``model`` (the network in ParlAI's parameter names), ``hf`` (Hugging Face weights in
those names) and ``search`` (ParlAI's TreeSearch: beam and greedy, exactly). Loading ParlAI's
own files, the engine's cached decoding and the serving routes are still to come (issue 20)."""
