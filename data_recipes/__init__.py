"""Command-line recipes that build the data the trainer reads.

    python -m data_recipes.corpus    OUT_DIR                 # bundled Shakespeare -> train.txt / val.txt
    python -m data_recipes.tokenizer --train FILES OUT.model # lossless SentencePiece model
    python -m data_recipes.prepare   --train FILES --tokenizer OUT.model OUT_DIR

The logic lives in ``mhc_train.data`` (so the trainer can use it without these scripts); the recipes
only parse arguments, print a summary and turn ``DataError`` into a one-line error and exit code 2.
"""
