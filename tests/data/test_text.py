"""Tokenizers, language-model windows, packing and MLM masking, on the shipped Tiny Shakespeare."""

import numpy as np
import pytest

from research.data import pipeline, text


@pytest.fixture(scope="module")
def corpus(data_dir) -> dict[str, str]:
    return {split: text.split_text("tiny_shakespeare", split, data_dir) for split in ("train", "validation")}


def test_char_tokenizer_round_trips_and_has_the_corpus_alphabet(corpus):
    tokenizer = text.CharTokenizer.from_text(corpus["train"])
    assert tokenizer.vocab_size == 66  # 65 distinct characters + padding
    ids = tokenizer.encode(corpus["validation"])
    assert len(ids) == 55770 and ids.min() >= 1 and tokenizer.decode(ids) == corpus["validation"]
    with pytest.raises(ValueError, match="character '€' is not in this tokenizer's vocabulary"):
        tokenizer.encode("€")


def test_subword_tokenizer_trains_deterministically_and_round_trips(corpus):
    sample = corpus["train"][:200_000]
    tokenizer = text.SubwordTokenizer.train(sample, vocab_size=256)
    assert text.SubwordTokenizer.train(sample, vocab_size=256).model_proto == tokenizer.model_proto
    assert tokenizer.vocab_size == 256
    ids = tokenizer.encode(corpus["validation"])
    assert tokenizer.decode(ids) == corpus["validation"], "whitespace and newlines survive"
    assert len(ids) < 0.6 * len(corpus["validation"]), "256 subwords: about 1.75 characters per token"
    assert (
        text.SubwordTokenizer(tokenizer.model_proto).encode("ROMEO:\n").tolist()
        == tokenizer.encode("ROMEO:\n").tolist()
    )


def test_windows_give_next_token_targets_and_batch_through_the_pipeline(corpus):
    tokenizer = text.CharTokenizer.from_text(corpus["train"])
    tokens = tokenizer.encode(corpus["train"])
    windows = text.WindowSource(tokens, length=128)
    assert len(windows) == (1003854 - 129) // 128 + 1 == 7842
    last = windows[len(windows) - 1]
    assert np.array_equal(last["inputs"][1:], last["targets"][:-1]) and last["targets"][-1] == tokens[7841 * 128 + 128]
    batch = next(iter(pipeline.train_batches(windows, batch_size=16, seed=0)))
    assert batch["inputs"].shape == batch["targets"].shape == (16, 128) and batch["inputs"].dtype == np.int32
    starts = [tokenizer.decode(row) for row in batch["inputs"]]
    assert all(start in corpus["train"] for start in starts)
    assert len(text.WindowSource(tokens[:300], length=100, stride=50)) == 4


def test_pack_fills_rows_in_order_with_segments_and_positions():
    documents = [np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8]), np.array([9, 10]), np.arange(11, 20)]
    packed = text.pack(documents, length=6)
    assert packed["tokens"].tolist() == [
        [1, 2, 3, 4, 5, 6],
        [7, 8, 9, 10, 11, 12],
        [13, 14, 15, 16, 17, 18],
        [19, 0, 0, 0, 0, 0],
    ]
    assert packed["segment_ids"].tolist() == [
        [1, 1, 1, 2, 2, 2],
        [1, 1, 2, 2, 3, 3],
        [1, 1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 0],
    ]
    assert packed["positions"].tolist() == [
        [0, 1, 2, 0, 1, 2],
        [0, 1, 0, 1, 0, 1],
        [0, 1, 2, 3, 4, 5],
        [0, 0, 0, 0, 0, 0],
    ]


def test_mlm_masking_picks_15_percent_and_splits_them_80_10_10():
    tokens = np.random.default_rng(0).integers(5, 1000, size=20000).astype(np.int32)
    tokens[:1000] = text.PAD_ID
    masked = text.mask_tokens(tokens, np.random.default_rng(1), mask_id=4, vocab_size=1000)
    chosen = masked["weights"] == 1
    assert chosen.sum() == 2850  # 15% of the 19,000 non-padding tokens
    assert not chosen[:1000].any() and np.array_equal(masked["targets"], tokens)
    assert np.array_equal(masked["inputs"][~chosen], tokens[~chosen])
    as_mask = (masked["inputs"][chosen] == 4).mean()
    unchanged = (masked["inputs"][chosen] == tokens[chosen]).mean()
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02 and abs(1 - as_mask - unchanged - 0.1) < 0.02
    again = text.mask_tokens(tokens, np.random.default_rng(1), mask_id=4, vocab_size=1000)
    assert np.array_equal(again["inputs"], masked["inputs"])


def test_whole_word_masking_predicts_every_piece_of_the_chosen_words():
    # ids 10-19 begin a word, 20-29 continue one, 4 (a newline) is a word alone; 0-3 are special
    kinds = np.zeros(30, np.int8)
    kinds[10:20], kinds[4] = text.WORD_BEGINS, text.WORD_ALONE
    rng = np.random.default_rng(0)
    words = [[rng.integers(10, 20), *rng.integers(20, 30, size=rng.integers(0, 4))] for _ in range(3000)]
    words[::7] = [[4]] * len(words[::7])
    words[::11] = [[20, 21]] * len(words[::11])  # a word that starts without a beginning piece: after a newline
    tokens = np.array([token for word in words for token in word], np.int32)
    tokens[:3] = 0  # padding splits the first word, whose tail then counts as a word of its own
    masked = text.mask_tokens(
        tokens, np.random.default_rng(1), mask_id=3, vocab_size=30, rate=0.4, special_ids=(0, 1, 2, 3), word_kinds=kinds
    )
    chosen = masked["weights"] == 1
    # the budget: at most 40% of the non-special tokens, short of it by less than one word
    assert 0.4 * 0.99 * (len(tokens) - 3) < chosen.sum() <= round(0.4 * (len(tokens) - 3))
    starts = np.cumsum([0] + [len(word) for word in words])
    for first, end in zip(starts[:-1], starts[1:]):
        first = max(first, 3)
        if first < end:  # each word is predicted whole or not at all
            assert chosen[first:end].all() or not chosen[first:end].any(), tokens[first:end]
    assert not chosen[:3].any() and np.array_equal(np.unique(masked["inputs"][chosen] == 3), [False, True])
    plain = text.mask_tokens(
        tokens, np.random.default_rng(1), mask_id=3, vocab_size=30, rate=0.4, special_ids=(0, 1, 2, 3)
    )
    split = sum(0 < plain["weights"][max(a, 3) : b].sum() < b - max(a, 3) for a, b in zip(starts[:-1], starts[1:]))
    assert split > 1000  # per-piece masking, for contrast, predicts part of many words


def test_mlm_random_replacements_are_real_tokens():
    special = (text.PAD_ID, 1, 2, 3, 9)  # padding, sentencepiece's unk/bos/eos, a [CLS]
    tokens = np.full(20000, 5, np.int32)
    tokens[::100] = 9
    masked = text.mask_tokens(tokens, np.random.default_rng(0), mask_id=10, vocab_size=10, special_ids=special)
    replaced = masked["inputs"][(masked["weights"] == 1) & (masked["inputs"] != 10) & (masked["inputs"] != 5)]
    assert len(replaced) > 200  # ~10% of the 2,970 chosen, less the 1/5 drawn as the token itself
    assert sorted(set(replaced.tolist())) == [4, 6, 7, 8]  # never 0-3, 9 or the mask id 10
    assert not masked["weights"][::100].any()


def test_mlm_masking_in_a_pipeline_is_deterministic_and_resumes():
    source = pipeline.array_source(tokens=np.random.default_rng(0).integers(5, 100, size=(32, 64)).astype(np.int32))
    mask = lambda record, rng: text.mask_tokens(record["tokens"], rng, mask_id=4, vocab_size=100)
    batches = lambda: iter(pipeline.train_batches(source, batch_size=8, seed=0, random_transform=mask))
    first, second = batches(), batches()
    next(first), next(second)
    state = first.get_state()
    expected = [next(first)["inputs"] for _ in range(5)]
    resumed = batches()
    resumed.set_state(state)
    assert all(np.array_equal(want, next(resumed)["inputs"]) for want in expected)
    assert np.array_equal(next(second)["inputs"], expected[0])


def test_window_columns_gather_the_same_windows_as_window_source(corpus):
    tokens = text.CharTokenizer.from_text(corpus["train"]).encode(corpus["train"])
    columns, gather = text.window_columns(tokens, length=64)
    windows = text.WindowSource(tokens, length=64)
    assert len(columns["start"]) == len(windows) == 15685
    batch = next(iter(pipeline.array_batches(columns, batch_size=8, seed=0, transform=gather)))
    assert batch["inputs"].shape == (8, 64) and batch["inputs"].dtype == np.int32
    for row_inputs, row_targets in zip(batch["inputs"], batch["targets"]):
        index = int(np.flatnonzero([np.array_equal(windows[i]["inputs"], row_inputs) for i in range(len(windows))])[0])
        assert np.array_equal(windows[index]["targets"], row_targets)
