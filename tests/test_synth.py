"""The built-in synthetic verifiable task: determinism, disjoint splits, verifiable solutions,
injected errors that are caught at the right step, and the `data synth` command."""
from __future__ import annotations

import json
import re
from fractions import Fraction

import pytest

import rlhf_plugins
from rlhf_plugins.cli.main import main
from rlhf_plugins.data import synth
from rlhf_plugins.data.problems import (INSTRUCTION, KINDS, SPLITS, generate_problems, make_problem,
                                        split_of)
from rlhf_plugins.errors import ConfigError

N = 300


@pytest.fixture(scope="module")
def exact():
    return rlhf_plugins.registry(reload=True).reward_functions.get("exact_answer")


@pytest.fixture(scope="module")
def fmt():
    return rlhf_plugins.registry(reload=True).reward_functions.get("format")


def reference_answer(kind, v):
    """The answer computed directly from the problem's numbers (independent of the solver)."""
    return {
        "add": lambda: v[0] + v[1],
        "sub": lambda: v[0] - v[1],
        "mul": lambda: v[0] * v[1],
        "two_step": lambda: v[0] + v[1] - v[2],
        "percent": lambda: Fraction(v[0] * v[1], 100),
        "discount": lambda: v[1] - Fraction(v[0] * v[1], 100),
    }[kind]()


_ARITH = re.compile(r"^(?:\d+% = )?([-\d./]+(?: [-+*/] [-\d./]+)+) = ([-\d./]+)\.$")


def arithmetic_ok(step):
    """None for a non-arithmetic step, else whether its `lhs = rhs` holds (exact fractions)."""
    if re.fullmatch(r"(\d+)% = ([\d.]+)\.", step):
        p, dec = re.fullmatch(r"(\d+)% = ([\d.]+)\.", step).groups()
        return Fraction(int(p), 100) == Fraction(dec)
    m = _ARITH.match(step)
    if not m:
        return None
    tokens = m.group(1).split()
    value = Fraction(tokens[0])
    for op, x in zip(tokens[1::2], tokens[2::2]):
        x = Fraction(x)
        value = {"+": value + x, "-": value - x, "*": value * x, "/": value / x}[op]
    return value == Fraction(m.group(2))


def test_course_notes_example_problem(exact):
    p = make_problem("percent", (15, 80))
    assert p.question == "What is 15% of 80?"
    assert p.steps == ("15% = 0.15.", "0.15 * 80 = 12.", "The answer is 12.")
    assert p.solution == "15% = 0.15.\n\n0.15 * 80 = 12.\n\nThe answer is 12."
    assert p.answer == 12 and p.error_steps == (1,)
    wrong = p.corrupted(1, -1)
    assert wrong == ("15% = 0.15.", "0.15 * 80 = 11.", "The answer is 11.")
    assert p.step_labels(1) == [1, -1, -1]  # step 1 fine, step 2 wrong, answer wrong
    assert exact([p.prompt], [p.solution], answer=[str(p.answer)]) == [1.0]
    assert exact([p.prompt], ["\n\n".join(wrong)], answer=[str(p.answer)]) == [0.0]


def test_deterministic_by_seed():
    a = generate_problems(N, seed=3)
    assert a == generate_problems(N, seed=3)
    assert a != generate_problems(N, seed=4)
    for build in synth.ROW_BUILDERS.values():
        assert build(40, 5, "train") == build(40, 5, "train")
        assert build(40, 5, "train") != build(40, 6, "train")
    # generation is sequential: the first problems do not depend on n
    assert generate_problems(50, seed=3) == a[:50]


def test_splits_are_disjoint_and_problems_distinct():
    keys = {}
    for split in SPLITS:
        for seed in (0, 1):
            ps = generate_problems(N if split == "train" else 150, seed=seed, split=split)
            assert all(p.split == split for p in ps)
            these = [(p.kind, p.numbers) for p in ps]
            assert len(set(these)) == len(these)
            keys.setdefault(split, set()).update(these)
            assert all(split_of(k, v) == split for k, v in these)
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    questions = {split: {make_problem(k, v).question for k, v in ks} for split, ks in keys.items()}
    assert not questions["train"] & questions["test"]


def test_every_kind_appears_and_can_be_restricted():
    ps = generate_problems(N)
    assert {p.kind for p in ps} == set(KINDS)
    only = generate_problems(30, kinds=["percent"])
    assert {p.kind for p in only} == {"percent"}
    with pytest.raises(ConfigError, match="unknown synthetic problem kind 'division'"):
        generate_problems(3, kinds=["division"])
    with pytest.raises(ConfigError, match="unknown synthetic split 'dev'"):
        generate_problems(3, split="dev")
    with pytest.raises(ConfigError, match="could not find 300 distinct test problems"):
        generate_problems(300, split="test", kinds=["mul"])


def test_correct_solutions_verify_and_every_step_is_right(exact, fmt):
    ps = generate_problems(N, seed=1)
    for p in ps:
        assert Fraction(p.answer) == reference_answer(p.kind, p.numbers)
        assert p.steps[-1] == f"The answer is {p.answer}."
        assert all("\n\n" not in s for s in p.steps) and p.solution.split("\n\n") == list(p.steps)
        for step in p.steps:
            assert arithmetic_ok(step) in (None, True), step
        assert any(arithmetic_ok(s) for s in p.steps)
        assert p.steps[-2].endswith(f"= {p.answer}.")  # the last computation gives the answer
    assert exact([p.prompt for p in ps], [p.solution for p in ps],
                 answer=[str(p.answer) for p in ps]) == [1.0] * len(ps)
    assert fmt([p.prompt for p in ps], [p.solution for p in ps]) == [1.0] * len(ps)


def test_sft_rows(exact):
    rows = synth.sft_rows(50, seed=2)
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert INSTRUCTION in user["content"]
        assert exact([user["content"]], [[assistant]], answer=[row["answer"]]) == [1.0]


def test_preference_pairs(exact, fmt):
    rows = synth.preference_rows(N, seed=2)
    kinds = [r["rejected_kind"] for r in rows]
    assert 0.1 < kinds.count("rambling") / len(rows) < 0.4 and "error" in kinds
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    assert exact(prompts, [r["chosen"] for r in rows], answer=answers) == [1.0] * len(rows)
    rejected = exact(prompts, [r["rejected"] for r in rows], answer=answers)
    for row, score in zip(rows, rejected):
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        if row["rejected_kind"] == "error":
            assert score == 0.0
            steps = row["rejected"][0]["content"].split("\n\n")
            assert arithmetic_ok(steps[row["error_step"]]) is False
        else:  # rambling: right answer, well formed, but longer
            assert score == 1.0 and row["error_step"] == -1
            assert len(row["rejected"][0]["content"]) > len(row["chosen"][0]["content"])
    assert fmt(prompts, [r["rejected"] for r in rows]) == [1.0] * len(rows)


def test_unsupported_answers_keep_the_work_but_change_the_final_number(exact, fmt):
    rows = synth.preference_rows(N, seed=3, rambling_fraction=0.2, unsupported_fraction=0.4)
    kinds = [r["rejected_kind"] for r in rows]
    assert 0.25 < kinds.count("unsupported") / len(rows) < 0.55 and {"rambling", "error"} <= set(kinds)
    # the default mix is unchanged by the new option (same rows as before it existed)
    assert synth.preference_rows(20, seed=2) == synth.preference_rows(20, seed=2, unsupported_fraction=0.0)
    for row in (r for r in rows if r["rejected_kind"] == "unsupported"):
        chosen = row["chosen"][0]["content"].split("\n\n")
        rejected = row["rejected"][0]["content"].split("\n\n")
        assert rejected[:-1] == chosen[:-1] and rejected[-1] != chosen[-1]  # only the answer line
        assert row["error_step"] == len(rejected) - 1
        assert exact([row["prompt"]], [row["rejected"]], answer=[row["answer"]]) == [0.0]
        assert fmt(None, [row["rejected"]]) == [1.0]  # still well formed
    with pytest.raises(ConfigError, match="at most 1"):
        synth.preference_rows(3, rambling_fraction=0.6, unsupported_fraction=0.6)


def test_outcome_rows_with_several_candidates_per_prompt(exact):
    rows = synth.outcome_rows(30, seed=4, per_prompt=4, unsupported_fraction=0.5)
    assert len(rows) == 120
    for i in range(0, len(rows), 4):  # consecutive blocks share the problem
        assert len({r["uid"] for r in rows[i:i + 4]}) == 1
    scores = exact([r["prompt"] for r in rows], [r["completion"] for r in rows],
                   answer=[r["answer"] for r in rows])
    assert [int(s) for s in scores] == [r["label"] for r in rows]
    kinds = {r["completion_kind"] for r in rows}
    assert kinds == {"correct", "unsupported", "error"}
    assert all((r["completion_kind"] == "correct") == (r["label"] == 1) for r in rows)
    with pytest.raises(ConfigError, match="per_prompt"):
        synth.outcome_rows(3, per_prompt=0)


def test_ranked_rows_are_ordered_best_to_worst(exact, fmt):
    for k in (2, 3, 4):
        rows = synth.ranked_rows(40, seed=1, k=k)
        for row in rows:
            comps = row["completions"]
            assert len(comps) == k == len(row["completion_kinds"])
            scores = exact([row["prompt"]] * k, comps, answer=[row["answer"]] * k)
            assert scores == sorted(scores, reverse=True) and scores[0] == 1.0 and scores[-1] == 0.0
            if k == 4:
                assert scores == [1.0, 1.0, 0.0, 0.0]
                assert fmt(None, comps) == [1.0, 1.0, 1.0, 0.0]
                lengths = [len(c[0]["content"]) for c in comps]
                assert lengths[1] > lengths[0]
    with pytest.raises(ConfigError, match="k must be 2, 3 or 4"):
        synth.ranked_rows(3, k=5)


def test_outcome_labels_equal_the_verifier(exact):
    rows = synth.outcome_rows(N, seed=4)
    labels = [r["label"] for r in rows]
    assert 0.35 < sum(labels) / len(labels) < 0.65
    scores = exact([r["prompt"] for r in rows], [r["completion"] for r in rows],
                   answer=[r["answer"] for r in rows])
    assert [int(s) for s in scores] == labels
    assert all((r["error_step"] == -1) == (r["label"] == 1) for r in rows)


def test_step_labels_match_the_injected_error(exact):
    rows = synth.step_rows(N, seed=5)
    with_error = [r for r in rows if r["error_step"] >= 0]
    assert 0.35 < len(with_error) / len(rows) < 0.65
    for row in rows:
        steps, labels, e = row["steps"], row["labels"], row["error_step"]
        assert len(steps) == len(labels) and set(labels) <= {-1, 0, 1}
        checks = [arithmetic_ok(s) for s in steps]
        score = exact([row["prompt"]], ["\n\n".join(steps)], answer=[row["answer"]])[0]
        if e < 0:
            assert -1 not in labels and score == 1.0
            assert all(c in (None, True) for c in checks)
        else:
            assert score == 0.0
            # the first step whose arithmetic is wrong is exactly the labelled one
            assert checks.index(False) == e
            assert labels[e:] == [-1] * (len(steps) - e)
            assert all(lab in (0, 1) for lab in labels[:e])
        for step, lab in zip(steps, labels):
            if lab == 0:  # neutral steps restate the question: no arithmetic
                assert arithmetic_ok(step) is None
    neutral = [lab for r in rows for lab in r["labels"] if lab == 0]
    assert neutral, "some problems start with a neutral restatement"


def test_rl_rows_are_trl_conversational_prompts(exact):
    from trl.data_utils import is_conversational

    rows = synth.rl_rows(30, seed=0, split="test")
    for row in rows:
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
        assert is_conversational({"prompt": row["prompt"]})
        assert row["answer"] == str(int(row["answer"]))
    held_out = {r["uid"] for r in rows}
    assert not held_out & {r["uid"] for r in synth.rl_rows(N, seed=0, split="train")}


def test_datasets_are_hf_datasets():
    import datasets

    expected = {
        synth.problems: {"uid", "kind", "split", "question", "prompt", "answer", "steps", "solution"},
        synth.sft_dataset: {"messages", "uid", "kind", "answer"},
        synth.preference_dataset: {"prompt", "chosen", "rejected", "rejected_kind", "error_step",
                                   "uid", "kind", "answer"},
        synth.ranked_dataset: {"prompt", "completions", "completion_kinds", "uid", "kind", "answer"},
        synth.outcome_dataset: {"prompt", "completion", "label", "error_step", "completion_kind", "uid",
                                "kind", "answer"},
        synth.step_dataset: {"prompt", "steps", "labels", "error_step", "uid", "kind", "answer"},
        synth.rl_dataset: {"prompt", "answer", "uid", "kind"},
    }
    for build, columns in expected.items():
        ds = build(12, seed=1, split="validation")
        assert isinstance(ds, datasets.Dataset) and len(ds) == 12
        assert set(ds.column_names) == columns
    ds = synth.step_dataset(12, seed=1)
    assert ds[0] == synth.step_rows(12, seed=1)[0]


def test_solutions_stay_short():
    # ~4 characters per token for this text: keeps prompt + solution well under ~96 tokens
    for p in generate_problems(N, seed=7):
        assert len(p.prompt_text) + len(p.solution) < 300


def test_cli_writes_every_dataset(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--n", "20", "--seed", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    names = {f"{d}_{s}.jsonl" for d in synth.ROW_BUILDERS for s in ("train", "test")}
    assert set(summary) == names
    assert {p.name for p in out.iterdir()} == names | {"manifest.json"}  # no temp files left
    for name in names:
        dataset, split = name[:-6].rsplit("_", 1)
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        n = 20 if split == "train" else 4
        assert rows == synth.ROW_BUILDERS[dataset](n, 1, split)
        assert summary[name]["rows"] == n
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 1 and manifest["answer_template"] == "The answer is {}."
    # the datasets library reads the files back
    import datasets

    ds = datasets.load_dataset("json", data_files=str(out / "rl_test.jsonl"), split="train")
    assert len(ds) == 4


def test_cli_table_and_errors(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "3", "--n-test", "2",
                 "--splits", "train,validation"]) == 0
    text = capsys.readouterr().out
    assert "sft_validation.jsonl" in text and "preference" in text
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "-1"]) == 2
    assert "--n: expected a positive integer, got -1" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path), "--splits", "dev"]) == 2


def test_reward_heads_get_the_rows_they_declare():
    """A head declares its rows (sdk.SyntheticRows); data/ builds them with the task's builders."""
    from dataclasses import dataclass

    from rlhf_plugins.sdk import RewardHead, SyntheticRows

    heads = rlhf_plugins.registry().reward_heads
    n, seed = 10, 3
    assert heads.get("prm").synthetic_rows(n, seed, "train") == synth.step_rows(n, seed, "train")
    assert heads.get("value").synthetic_rows(n, seed, "test") == synth.outcome_rows(n, seed, "test")
    # 4 candidates per problem: 3 problems, the first 10 of their 12 rows
    assert heads.get("orm").synthetic_rows(n, seed, "train") == synth.outcome_rows(
        3, seed, "train", unsupported_fraction=0.5, per_prompt=4)[:n]
    assert heads.get("bradley_terry", loss="balanced").synthetic_rows(n, seed, "train") \
        == synth.ranked_rows(n, seed, "train")
    pairs = synth.preference_rows(n, seed, "train", rambling_fraction=1 / 3, unsupported_fraction=1 / 3)
    assert heads.get("bradley_terry").synthetic_rows(n, seed, "train") == pairs
    margin = heads.get("bradley_terry", loss="margin").synthetic_rows(n, seed, "train")
    assert [{k: v for k, v in r.items() if k != "margin"} for r in margin] == pairs
    assert [r["margin"] for r in margin] == [0.0 if r["rejected_kind"] == "rambling" else 1.0
                                              for r in pairs]
    assert {r["rejected_kind"] for r in pairs} == {"rambling", "unsupported", "error"}

    @dataclass(frozen=True)
    class NoRows(RewardHead):
        name = "no_rows"

    @dataclass(frozen=True)
    class StepRows(RewardHead):
        name = "step_rows"
        label_kind = "step"

        def synthetic_format(self):
            return SyntheticRows("step", {"error_fraction": 1.0})

    with pytest.raises(ConfigError, match="reward head 'no_rows' has no built-in synthetic rows"):
        NoRows().synthetic_rows(2, 0, "train")
    assert StepRows().synthetic_rows(4, 1, "train") == synth.step_rows(4, 1, "train", error_fraction=1.0)
    with pytest.raises(ConfigError, match="kind must be one of"):
        SyntheticRows("pairs")
    with pytest.raises(ConfigError, match="a margin needs preference rows"):
        SyntheticRows("outcome", margin=True)
