"""The runtime: everything between a checkpoint and the decoding core, with no HTTP in it.

``startup`` checks the input, spawns and watches the tensor-parallel workers and loads each
rank; ``sizing`` sizes the KV cache and the one per-sequence limit; ``builder`` puts the
decoding stack together with one set of defaults; ``runner`` is one rank's model and cache;
``ranks`` is the rank protocol (every opcode); ``engine`` is rank 0's loop and ``handles`` how a
caller waits on it; ``generate`` is the step in-process. opt-serve (``server/``) and ``LLM``
both start through here.
"""
