import math

import numpy as np
import pytest

from gpt2forge.data.shards import write_shard
from gpt2forge.errors import UserError
from gpt2forge.eval.baseline import unigram_loss

VOCAB = 10
T = 4
# Two val shards in name order. Shard 0: 11 tokens → (11-1)//4 = 2 sequences, targets [1:5] and [5:9]; its tokens
# 0, 9 and 10 are never targets. Shard 1: 9 tokens → 2 sequences, targets [1:5] and [5:9]; token 0 never a target.
# The never-scored tokens are 9s, a token the train split lacks: counting them would change the loss a lot.
VAL_0 = [9, 1, 2, 3, 1, 1, 1, 2, 4, 9, 9]
VAL_1 = [9, 5, 5, 6, 1, 2, 3, 4, 1]
TRAIN_A = [1, 1, 1, 2, 2, 3]  # name order: a before b
TRAIN_B = [4, 5, 6, 1, 2, 0, 0, 7]


@pytest.fixture
def data_dir(tmp_path):
    write_shard(tmp_path / "x_val_000000.bin", np.array(VAL_0))
    write_shard(tmp_path / "x_val_000001.bin", np.array(VAL_1))
    write_shard(tmp_path / "x_train_000002.bin", np.array(TRAIN_A))
    write_shard(tmp_path / "x_train_000003.bin", np.array(TRAIN_B))
    return tmp_path


def by_hand(train: list[int], targets: list[int]) -> float:
    """Add-one smoothed frequencies over a vocabulary of VOCAB, cross-entropy in nats averaged over targets."""
    total = len(train) + VOCAB
    return sum(-math.log((train.count(t) + 1) / total) for t in targets) / len(targets)


def test_scores_exactly_the_targets_of_the_first_val_tokens_over_T_windows(data_dir):
    first_three = VAL_0[1:5] + VAL_0[5:9] + VAL_1[1:5]  # windows 0, 1 of shard 0, window 0 of shard 1
    result = unigram_loss(data_dir, T, val_tokens=12, vocab_size=VOCAB)
    assert result["tokens"] == 12
    assert result["loss"] == pytest.approx(by_hand(TRAIN_A + TRAIN_B, first_three), rel=1e-12)
    assert result["train_tokens_counted"] == result["train_tokens_total"] == 14 and not result["capped"]
    # val_tokens that is not a multiple of T: whole sequences only (14 // 4 = 3)
    assert unigram_loss(data_dir, T, val_tokens=14, vocab_size=VOCAB) == result
    # the first window only
    one = unigram_loss(data_dir, T, val_tokens=4, vocab_size=VOCAB)
    assert one["tokens"] == 4 and one["loss"] == pytest.approx(by_hand(TRAIN_A + TRAIN_B, VAL_0[1:5]), rel=1e-12)


def test_val_tokens_zero_scores_every_sequence_of_the_split(data_dir):
    every = VAL_0[1:9] + VAL_1[1:9]
    result = unigram_loss(data_dir, T, val_tokens=0, vocab_size=VOCAB)
    assert result["tokens"] == 16
    assert result["loss"] == pytest.approx(by_hand(TRAIN_A + TRAIN_B, every), rel=1e-12)
    # more than the split holds: all of it, and the result says how many tokens were scored
    assert unigram_loss(data_dir, T, val_tokens=1000, vocab_size=VOCAB) == result
    # not the same as scoring every val token (the 9s outside any window are expensive)
    assert result["loss"] < by_hand(TRAIN_A + TRAIN_B, VAL_0 + VAL_1) - 0.2


def test_train_tokens_are_capped_in_shard_name_order(data_dir):
    result = unigram_loss(data_dir, T, val_tokens=0, vocab_size=VOCAB, train_tokens_cap=8)
    assert result["train_tokens_counted"] == 8 and result["train_tokens_total"] == 14 and result["capped"]
    assert result["loss"] == pytest.approx(by_hand((TRAIN_A + TRAIN_B)[:8], VAL_0[1:9] + VAL_1[1:9]), rel=1e-12)


def test_unusable_inputs_are_refused_clearly(data_dir, tmp_path):
    with pytest.raises(UserError, match="less than one sequence"):
        unigram_loss(data_dir, T, val_tokens=3, vocab_size=VOCAB)
    with pytest.raises(UserError, match="outside the vocabulary"):
        unigram_loss(data_dir, T, val_tokens=0, vocab_size=7)  # the train split holds a 7
    with pytest.raises(UserError, match="does not exist"):
        unigram_loss(tmp_path / "gone", T, val_tokens=0)
    with pytest.raises(UserError, match="no sequence"):
        unigram_loss(data_dir, 64, val_tokens=0, vocab_size=VOCAB)
