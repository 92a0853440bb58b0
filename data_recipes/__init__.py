"""Command-line recipes that build the data the trainer reads (``python -m data_recipes`` lists them).

    python -m data_recipes.corpus    OUT_DIR                  # bundled Shakespeare -> train.txt / val.txt
    python -m data_recipes.tokenizer --train FILES OUT.model  # lossless SentencePiece (OUT.json: byte-level BPE)
    python -m data_recipes.prepare   --train FILES --tokenizer TOK OUT_DIR   # shards; resumable, --part i/N
    python -m data_recipes.merge     OUT_DIR PART_DIR...      # join parts prepared on several machines
    python -m data_recipes.check     OUT_DIR [--full]         # sizes, token ids, sha256

The logic lives in ``mhc_train.data`` (so the trainer can use it without these scripts); the recipes
only parse arguments, print a summary and turn ``DataError`` into a one-line error and exit code 2.
"""
