#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron-Core (same as ``megalong convert``).

    python tools/convert_checkpoint.py hf-to-megatron HF_DIR OUT_DIR
    python tools/convert_checkpoint.py megatron-to-hf CHECKPOINT_DIR OUT_DIR --tokenizer DIR
"""

import sys

from megalong.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
