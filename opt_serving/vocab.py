"""metaseq's dictionary and position facts: plain numbers, importable without torch (the wire
protocol and the agent use them)."""

# metaseq pads its 50265-symbol dictionary to a multiple of 8: ids 50265..50271 are
# "madeupword" padding symbols that must never be produced.
VOCAB_SIZE = 50272
DICT_SIZE = 50265
MAX_POSITIONS = 2048
# Learned positions start at index 2 (fairseq's padding_idx + 1): the table has 2050 rows.
POSITION_OFFSET = 2
PAD_ID = 1
BOS_ID = 0
EOS_ID = 2
