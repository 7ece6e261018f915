"""GPT-2 BPE through tiktoken, with a vocabulary that resolves offline.

``tiktoken.get_encoding("gpt2")`` downloads OpenAI's two vocab files, which fails without network. We build the
same encoding from the same two files (``encoder.json`` + ``vocab.bpe``, OpenAI's public data files): from a
directory given by ``--vocab-dir`` or the ``GPT2FORGE_VOCAB_DIR`` environment variable (the OpenAI names, or
Hugging Face's ``vocab.json`` + ``merges.txt``), else the copy shipped inside this package (``vocab/``), so any
install works offline with nothing else to fetch. Either is checked against the published sha256 of the files.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation pattern

from .errors import UserError

VOCAB_DIR_ENV = "GPT2FORGE_VOCAB_DIR"
ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
PACKAGED_VOCAB = Path(__file__).parent / "vocab"  # package data: encoder.json + vocab.bpe
EOT_TOKEN = 50256  # <|endoftext|>: between documents in the training data, and where generation stops


@dataclass(frozen=True)
class VocabFiles:
    """Where the two verified vocab files were found."""

    encoder_json: str
    vocab_bpe: str
    source: str

    def read(self) -> tuple[bytes, bytes]:
        """The bytes of (encoder.json, vocab.bpe); Hugging Face calls them vocab.json and merges.txt."""
        return Path(self.encoder_json).read_bytes(), Path(self.vocab_bpe).read_bytes()


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
                f"it is not the GPT-2 vocab, or it is corrupted ({origin})"
            )
        found.append(str(path))
    return VocabFiles(found[0], found[1], f"{directory} ({origin})")


def resolve_vocab(vocab_dir: str | os.PathLike | None = None) -> VocabFiles:
    """Verified GPT-2 vocab files: ``vocab_dir``, else ``$GPT2FORGE_VOCAB_DIR``, else the packaged copy."""
    if vocab_dir is not None:
        return _files_in(Path(vocab_dir), "--vocab-dir")
    if os.environ.get(VOCAB_DIR_ENV):
        return _files_in(Path(os.environ[VOCAB_DIR_ENV]), f"${VOCAB_DIR_ENV}")
    return _files_in(PACKAGED_VOCAB, "shipped with gpt2forge; reinstall it if this is damaged")


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
