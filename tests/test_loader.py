import numpy as np
import pytest
import torch

from gpt2forge.data.loader import TokenLoader, val_batches
from gpt2forge.data.shards import ShardError, write_shard
from gpt2forge.errors import UserError
from gpt2forge.models import IGNORE_INDEX

T = 8


def make_shards(directory, sizes, split="train", start=0):
    """Shards whose token values are their global positions (mod 2^16), so every window is identifiable."""
    directory.mkdir(exist_ok=True)
    for i, n in enumerate(sizes):
        write_shard(directory / f"corpus_{split}_{i:06d}.bin", (np.arange(start, start + n) % 65536).astype(np.uint16))
        start += n
    return directory


def first_tokens(x):
    return [int(v) for v in x[:, 0]]


@pytest.fixture
def data_dir(tmp_path):
    # 4 shards of uneven sizes: 12, 9, 15 and 6 sequences of T=8 (+1 token each)
    return make_shards(tmp_path / "data", [12 * T + 1, 9 * T + 1, 15 * T + 5, 6 * T + 1])


def epoch_starts(loader, steps, micro):
    return [t for s in range(steps) for m in range(micro) for t in first_tokens(loader.batch(s, m)[0])]


@pytest.mark.parametrize("shuffle", [False, True])
def test_one_epoch_reads_every_sequence_once_across_ranks(data_dir, shuffle):
    world, B, accum = 3, 2, 2
    loaders = [TokenLoader(data_dir, B, T, rank=r, world_size=world, grad_accum=accum, shuffle=shuffle, seed=7)
               for r in range(world)]
    per_epoch = loaders[0].sequences_per_epoch
    assert per_epoch == 12 + 9 + 15 + 6
    steps = per_epoch // (B * world * accum)  # 3 steps × 12 sequences = 36 of 42
    seen = [t for loader in loaders for t in epoch_starts(loader, steps, accum)]
    assert len(seen) == len(set(seen)) == steps * B * world * accum  # disjoint ranks, nothing repeated
    seqs = loaders[0].sequences
    all_starts = {int(seqs.window(s, k)[0]) for s in range(len(seqs.counts)) for k in range(int(seqs.counts[s]))}
    assert set(seen) <= all_starts


@pytest.mark.parametrize("shuffle", [False, True])
def test_full_epoch_covers_all_then_reshuffles(data_dir, shuffle):
    loader = TokenLoader(data_dir, 1, T, shuffle=shuffle, seed=3)  # one sequence per step: epochs align with steps
    n = loader.sequences_per_epoch
    epoch0 = epoch_starts(loader, n, 1)
    epoch1 = [first_tokens(loader.batch(s)[0])[0] for s in range(n, 2 * n)]
    assert len(set(epoch0)) == n and set(epoch0) == set(epoch1)
    assert (epoch0 != epoch1) == shuffle
    if not shuffle:
        assert epoch0 == sorted(epoch0)


def test_targets_are_inputs_shifted(data_dir):
    x, y = TokenLoader(data_dir, 4, T, seed=1).batch(5, 0)
    assert x.dtype == torch.int64 and x.shape == (4, T)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # positions are consecutive tokens of the shard


def test_same_global_batch_on_one_or_two_ranks(data_dir):
    one = TokenLoader(data_dir, 2, T, world_size=1, grad_accum=2, seed=5)
    two = [TokenLoader(data_dir, 2, T, rank=r, world_size=2, grad_accum=1, seed=5) for r in range(2)]
    for step in range(7):
        single = torch.cat([one.batch(step, m)[0] for m in range(2)])
        multi = torch.cat([two[r].batch(step, 0)[0] for r in range(2)])
        assert torch.equal(single, multi)


def test_state_dict_resumes_exactly(data_dir):
    a = TokenLoader(data_dir, 2, T, grad_accum=3, seed=11)
    reference = [a.next_batch()[0] for _ in range(40)]
    b = TokenLoader(data_dir, 2, T, grad_accum=3, seed=11)
    for _ in range(17):
        b.next_batch()
    state = b.state_dict()
    c = TokenLoader(data_dir, 2, T, grad_accum=3, seed=11)
    c.load_state_dict(state)
    assert all(torch.equal(c.next_batch()[0], ref) for ref in reference[17:])


def test_prefetched_batches_are_the_pure_function_of_the_position(data_dir):
    """next_batch prepares the following batch in a thread: what it hands out is still batch(step, micro_step),
    also right after the position was reloaded (a stale prefetch is discarded)."""
    loader = TokenLoader(data_dir, 2, T, grad_accum=3, seed=5)
    positions = [(s, m) for s in range(4) for m in range(3)]
    for step, micro in positions[:7]:
        assert all(torch.equal(a, b) for a, b in zip(loader.next_batch(), loader.batch(step, micro)))
    state = loader.state_dict()  # position (2, 1): the batch of (2, 1) is being prefetched
    loader.load_state_dict({**state, "step": 1, "micro_step": 0})
    assert all(torch.equal(a, b) for a, b in zip(loader.next_batch(), loader.batch(1, 0)))
    loader.close()


def test_state_dict_refuses_other_seed_data_or_global_batch(data_dir, tmp_path):
    state = TokenLoader(data_dir, 2, T, world_size=2, seed=1).state_dict()
    with pytest.raises(UserError, match="seed: checkpoint 1, now 2"):
        TokenLoader(data_dir, 2, T, world_size=2, seed=2).load_state_dict(state)
    TokenLoader(data_dir, 4, T, world_size=1, seed=1).load_state_dict(state)  # elastic: the same global batch
    with pytest.raises(UserError, match="sequences_per_step: checkpoint 4, now 2"):
        TokenLoader(data_dir, 2, T, world_size=1, seed=1).load_state_dict(state)
    other = make_shards(tmp_path / "other", [50 * T + 1])
    with pytest.raises(UserError, match="data_fingerprint"):
        TokenLoader(other, 2, T, world_size=2, seed=1).load_state_dict(state)


def test_val_batches_are_disjoint_full_and_capped(tmp_path):
    val = make_shards(tmp_path / "d", [10 * T + 1, 7 * T + 1], split="val")
    make_shards(val, [T + 1])  # a train shard the val reader must ignore
    everything = list(val_batches(val, 3, T))  # 17 sequences: 5 full batches and one with a padding row
    assert len(everything) == 6 and all(x.shape == y.shape == (3, T) for x, y in everything)
    assert (everything[-1][1][2] == IGNORE_INDEX).all() and (everything[-1][1][:2] != IGNORE_INDEX).all()
    # 6 batches on 4 ranks: every rank runs 2 (a rank with an extra forward pass would hang FSDP's collectives)
    ranks = [list(val_batches(val, 3, T, rank=r, world_size=4)) for r in range(4)]
    assert [len(r) for r in ranks] == [2, 2, 2, 2]
    assert sorted(first_tokens(x) for r in ranks for x, y in r if (y != IGNORE_INDEX).any()) == \
        sorted(first_tokens(x) for x, _ in everything)
    assert len(list(val_batches(val, 3, T, max_tokens=2 * 3 * T))) == 2
    with pytest.raises(UserError, match="less than one sequence"):
        list(val_batches(val, 3, T, max_tokens=T - 1))


def test_missing_or_broken_data_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        TokenLoader(tmp_path / "nothing", 1, T)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no train shards \(\*_train_\*\.bin\)"):
        TokenLoader(tmp_path / "empty", 1, T)
    broken = make_shards(tmp_path / "broken", [20 * T])
    path = broken / "corpus_train_000000.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match="truncated"):
        TokenLoader(broken, 1, T)
    tiny = make_shards(tmp_path / "tiny", [T])
    with pytest.raises(UserError, match="too few tokens"):
        TokenLoader(tiny, 1, T)
