"""Write a tiny random Llama and its byte-level tokenizer to a folder, for CPU test runs of the training scripts.

    python -m tlora.training.toy_model /tmp/tiny-llama
    python math_train.py --base_model /tmp/tiny-llama --data_path peft/src/tlora/data/sample_math.jsonl ...
"""

from __future__ import annotations

import argparse
from pathlib import Path


def write_toy_model(directory: str | Path, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Save `tlora.toy.tiny_llama` and `tlora.toy.byte_tokenizer` with save_pretrained into `directory`."""
    from ..toy import byte_tokenizer, tiny_llama

    directory = Path(directory)
    tiny_llama(hidden_size=hidden_size, num_layers=num_layers, seed=seed).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def main() -> None:
    """Command line: python -m tlora.training.toy_model DIRECTORY [--hidden_size 64] [--num_layers 2]."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="Folder to write the model and tokenizer to.")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    print(write_toy_model(options.directory, hidden_size=options.hidden_size, num_layers=options.num_layers, seed=options.seed))


if __name__ == "__main__":
    main()
