import shutil
from pathlib import Path

import pytest

from gpt2forge.errors import UserError
from gpt2forge.tokenizer import VOCAB_DIR_ENV, get_tokenizer, resolve_vocab


def test_known_gpt2_ids():
    tok = get_tokenizer()
    assert tok.encode("Hello world, this is GPT-2.") == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]
    assert tok.eot == 50256 and tok.n_vocab == 50257


@pytest.mark.parametrize(
    "text",
    ["naïve café — 東京都 😀🚀 ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "tabs\tand\n\nnewlines   spaces", "Ελληνικά, русский, עברית, العربية"],
)
def test_unicode_round_trip(text):
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_special_token_text_is_not_a_special_token():
    tok = get_tokenizer()
    assert tok.eot not in tok.encode("<|endoftext|>")


def test_vocab_dir_from_env_and_hf_file_names(tmp_path, monkeypatch):
    files = resolve_vocab()
    shutil.copy(files.encoder_json, tmp_path / "vocab.json")  # Hugging Face's names for the same files
    shutil.copy(files.vocab_bpe, tmp_path / "merges.txt")
    monkeypatch.setenv(VOCAB_DIR_ENV, str(tmp_path))
    resolved = resolve_vocab()
    assert str(tmp_path) in resolved.source
    get_tokenizer.cache_clear()
    try:
        assert get_tokenizer().encode("Hello world") == [15496, 995]
    finally:
        get_tokenizer.cache_clear()


def test_vocab_with_wrong_hash_is_refused(tmp_path):
    files = resolve_vocab()
    shutil.copy(files.encoder_json, tmp_path / "encoder.json")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nĠ t\n")
    with pytest.raises(UserError, match=r"vocab\.bpe has sha256 .* not the GPT-2 vocab"):
        resolve_vocab(tmp_path)


def test_missing_vocab_dir_and_files_are_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_vocab(tmp_path / "nope")
    with pytest.raises(UserError, match="neither encoder.json nor vocab.json"):
        resolve_vocab(tmp_path)


def test_the_vocab_ships_inside_the_package(monkeypatch):
    """No other package, no network: the verified files are package data (the CI rehearsal installs the package
    into a bare venv and tokenizes from outside the source tree)."""
    import gpt2forge.tokenizer as tokenizer

    monkeypatch.delenv(VOCAB_DIR_ENV, raising=False)
    files = resolve_vocab()
    assert Path(files.encoder_json).parent == tokenizer.PACKAGED_VOCAB == Path(tokenizer.__file__).parent / "vocab"
    assert "shipped with gpt2forge" in files.source


def test_a_damaged_packaged_vocab_is_refused(tmp_path, monkeypatch):
    import gpt2forge.tokenizer as tokenizer

    monkeypatch.delenv(VOCAB_DIR_ENV, raising=False)
    shutil.copytree(tokenizer.PACKAGED_VOCAB, tmp_path / "vocab")
    with open(tmp_path / "vocab" / "encoder.json", "ab") as f:
        f.write(b" ")
    monkeypatch.setattr(tokenizer, "PACKAGED_VOCAB", tmp_path / "vocab")
    with pytest.raises(UserError, match=r"encoder\.json has sha256 .*shipped with gpt2forge; reinstall"):
        resolve_vocab()
