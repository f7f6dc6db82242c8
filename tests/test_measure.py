"""``mergekit_lssf.measure``: every measure against an independent float64 computation
(NLL and perplexity on a tiny toy model, by a hand-rolled log-softmax), the ratios and
the budget reading by hand, the bootstrap against a plain loop, and the splits."""

import ast
import copy
import math
import os

import numpy as np
import pytest
import torch

from mergekit_lssf import evaluate as ev
from mergekit_lssf import measure as m

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = [  # answers of different lengths, so batches need padding
    {"prompt": "Translate into Veltish: the cat", "answer": "ba ku"},
    {"prompt": "Say something long about rivers and boats, please.", "answer": "Rivers carry boats to the sea, slowly and far."},
    {"prompt": "Hi", "answer": "Hello there"},
    {"prompt": "Count to five", "answer": "one two three four five"},
    {"prompt": "What is red?", "answer": "An apple."},
]


@pytest.fixture(scope="module")
def toy(toy_dir):
    """The tiny aligned toy model (float32) with its tokenizer, and a float64 copy."""
    model, tokenizer = ev.load_model(str(toy_dir / "aligned"))
    return model, tokenizer, copy.deepcopy(model).double()


def _logp64(reference, ids):
    """[len(ids), vocab] log-probabilities of the next token after each position, by a
    hand-rolled log-softmax in float64 (numpy: x - max - log(sum(exp(x - max))))."""
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([ids])).logits[0].numpy().astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))


# -- refusal, empty answers --------------------------------------------------------


def test_the_detector_moved_and_evaluate_still_exports_it():
    assert ev.is_refusal is m.is_refusal and ev.REFUSAL_MARKERS is m.REFUSAL_MARKERS
    assert ev.REFUSAL_WINDOW == m.REFUSAL_WINDOW == 160 and ev.perplexity is m.perplexity
    assert m.is_refusal("I\u2019m sorry, but no.") and not m.is_refusal("Sure: step one")
    assert not m.is_refusal("x" * 160 + " I cannot")  # past the window
    assert m.is_refusal("x" * 150 + " I cannot")  # " i cannot" ends inside the first 160 characters


def test_refusal_and_empty_rates_are_shares_of_the_answers():
    answers = ["I'm sorry, I can't.", "Sure, here you go", "", "   ", "I cannot help with that", "ok"]
    assert m.refusal_rate(answers) == 2 / 6 and m.empty_rate(answers) == 2 / 6
    assert m.refusal_rate(["As an AI, I must decline"]) == 1.0 and m.empty_rate(["a"]) == 0.0
    assert m.refusal_rate(answers[1:4]) == 0.0 and m.empty_rate(answers[2:4]) == 1.0
    for rate in (m.refusal_rate, m.empty_rate):
        with pytest.raises(ValueError, match="no answers"):
            rate([])


# -- task NLL, utility kept, perplexity ---------------------------------------------


def test_row_nll_is_the_teacher_forced_answer_nll_in_float64(toy):
    """Per row, against an unpadded float64 pass of that row alone: the sum of
    -log p(token) over the answer's tokens after the chat head, by a hand-rolled
    log-softmax; batches of 2 and of 1 pad differently and agree."""
    model, tokenizer, reference = toy
    expected = []
    for row in ROWS:
        user = [{"role": "user", "content": row["prompt"]}]
        head = tokenizer(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
        full = tokenizer(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row["answer"]}],
                                                       tokenize=False), add_special_tokens=False)["input_ids"]
        assert full[:len(head)] == head and len(full) > len(head)
        logp = _logp64(reference, full)
        nll = 0.0
        for t in range(len(head), len(full)):  # position t - 1 predicts token t
            nll -= logp[t - 1, full[t]]
        expected.append((nll, len(full) - len(head)))
    assert len({t for _, t in expected}) > 2  # different lengths: padding is exercised
    for batch in (2, 1, 16):
        got = m.row_nll(model, tokenizer, ROWS, batch=batch)
        assert [t for _, t in got] == [t for _, t in expected]
        assert all(isinstance(n, float) for n, _ in got)
        for (g, _), (e, _) in zip(got, expected):
            assert abs(g - e) < 1e-4 * max(1.0, abs(e)), (batch, got, expected)
    got = m.row_nll(model, tokenizer, ROWS, batch=2)
    pooled = sum(e for e, _ in expected) / sum(t for _, t in expected)
    assert m.pooled_nll(got) == pytest.approx(pooled, rel=1e-5)
    assert m.answer_nll(model, tokenizer, ROWS, batch=2) == m.pooled_nll(got)
    assert m.row_nll(model, tokenizer, [], batch=2) == []


def test_pooled_nll_weighs_rows_by_their_tokens():
    assert m.pooled_nll([(3.0, 1), (6.0, 5)]) == 1.5  # not the mean of 3.0 and 1.2
    assert m.pooled_nll([[3.0, 1, 0.25], [6.0, 5, 1.0]]) == 1.5  # extra fields ignored
    assert m.pooled_nll([]) == 0.0
    nll = np.array([[3.0, 6.0, 1.0], [2.0, 2.0, 2.0]])
    tokens = np.array([1.0, 5.0, 2.0])
    per_model = m.pooled_nll_arrays(nll, tokens)
    assert per_model.shape == (2,)
    assert per_model[0] == pytest.approx(m.pooled_nll(list(zip(nll[0], tokens)))) and per_model[1] == 0.75


def test_utility_kept_and_won_back_by_hand():
    assert m.utility_kept(3.0, aligned_nll=5.0, finetuned_nll=1.0) == 0.5
    assert m.utility_kept(1.0, 5.0, 1.0) == 1.0 and m.utility_kept(5.0, 5.0, 1.0) == 0.0
    assert m.utility_kept(6.0, 5.0, 1.0) == -0.25 and m.utility_kept(0.5, 5.0, 1.0) == 1.125  # may leave [0, 1]
    assert math.isnan(m.utility_kept(1.0, 1.0, 1.0)) and math.isnan(m.utility_kept(1.0, 1.0, 2.0))  # nothing learned
    assert math.isnan(m.utility_kept(1.0, float("nan"), 1.0))
    assert m.won_back(0.5, aligned=0.9, finetuned=0.1) == pytest.approx(0.5)
    assert m.won_back(0.1, 0.9, 0.1) == 0.0 and m.won_back(0.9, 0.9, 0.1) == 1.0
    assert math.isnan(m.won_back(0.2, 0.1, 0.1)) and math.isnan(m.won_back(0.2, 0.1, 0.3))  # nothing lost
    # elementwise over models, NaN of the same shape when undefined
    got = m.utility_kept(np.array([5.0, 3.0, 1.0]), 5.0, 1.0)
    assert got.tolist() == [0.0, 0.5, 1.0]
    assert m.won_back(np.array([0.1, 0.5]), 0.9, 0.1).tolist() == pytest.approx([0.0, 0.5])
    for nan in (m.utility_kept(np.ones(3), 1.0, 1.0), m.won_back(np.ones(4), 0.2, 0.2)):
        assert nan.shape in ((3,), (4,)) and np.isnan(nan).all()


def test_perplexity_is_exp_of_the_mean_token_nll_over_windows(toy):
    """Against float64 by hand: windows of ``window`` predicted tokens, each scored alone
    (its first token is context only), the NLL pooled over every predicted token."""
    model, tokenizer, reference = toy
    text = ev.benign_text()[:600]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 40

    def by_hand(window):
        total, count = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1]
            logp = _logp64(reference, chunk)
            total -= sum(logp[t - 1, chunk[t]] for t in range(1, len(chunk)))
            count += len(chunk) - 1
        assert count == len(ids) - 1
        return math.exp(total / count)

    for window in (7, 16, 10_000):
        assert m.perplexity(model, tokenizer, text, window=window) == pytest.approx(by_hand(window), rel=1e-5)
    assert by_hand(7) != pytest.approx(by_hand(10_000), rel=1e-3)  # the windows matter: a mix-up would show
    assert m.perplexity(model, tokenizer, text) == pytest.approx(by_hand(256), rel=1e-5)


# -- reading a curve at a budget ------------------------------------------------------


def test_at_budget_reads_the_polyline_with_its_crossings():
    """The fine-tune (1, 0) starts every curve unless ``from_finetune`` is False; the value
    is the best vertex within the budget or the crossing of a segment with u = 1 - cost."""
    curve = [(0.99, 0.30), (0.90, 0.60), (0.50, 0.90)]
    assert m.at_budget(curve, 0.02) == pytest.approx(0.30 + (0.99 - 0.98) / (0.99 - 0.90) * 0.30)
    assert m.at_budget(curve, 0.005) == pytest.approx(0.30 * 0.005 / 0.01)  # on the first segment
    assert m.at_budget(curve, 0.05) == pytest.approx(0.30 + (0.99 - 0.95) / (0.99 - 0.90) * 0.30)
    assert m.at_budget(curve, 0.6) == 0.90  # the whole curve within the budget: its best vertex
    assert m.at_budget(curve, 0.0) == 0.0  # no cost allowed: the fine-tune itself
    assert m.at_budget([(0.90, 0.60)], 0.05) == pytest.approx(0.60 * 0.05 / 0.10)
    assert math.isnan(m.at_budget([(0.90, 0.60)], 0.05, from_finetune=False))  # a single point outside
    assert m.at_budget([(0.97, 0.60)], 0.05, from_finetune=False) == 0.60
    # the crossing on the way back into the budget counts, and beats every vertex within it
    back = [(0.90, 0.50), (0.97, 0.30)]
    assert m.at_budget(back, 0.05) == pytest.approx(0.50 - (0.95 - 0.90) / (0.97 - 0.90) * 0.20)
    assert m.at_budget(back, 0.05) > 0.30
    # a segment with both ends outside the budget is never read; a vertex on the line counts
    assert m.at_budget([(0.90, 0.50), (0.80, 0.90)], 0.05) == pytest.approx(0.25)
    assert m.at_budget([(0.75, 0.70), (0.50, 0.90)], 0.25) == 0.70
    assert m.at_budget([(0.90, 0.20), (0.99, 0.40), (0.80, 0.90)], 0.05) == pytest.approx(0.40 + 0.04 / 0.19 * 0.50)
    # u above 1 (the repair beats the fine-tune), falling through the budget line
    assert m.at_budget([(1.02, 0.10), (0.96, 0.50)], 0.02) == pytest.approx(0.10 + (1.02 - 0.98) / (1.02 - 0.96) * 0.40)
    assert math.isnan(m.at_budget([(0.9, float("nan"))], 0.05)) and math.isnan(m.at_budget([], 0.05, from_finetune=False))
    assert m.at_budget([], 0.05) == 0.0


# -- spread ------------------------------------------------------------------------


def _quantile_by_hand(values, q):
    """numpy's default (linear) quantile, written out."""
    xs = sorted(values)
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    return xs[lo] + (h - lo) * (xs[min(lo + 1, len(xs) - 1)] - xs[lo])


def test_bootstrap_interval_against_a_plain_loop():
    """The same index draws (one ``integers`` call of PCG64(seed)), each resample's mean
    by ``math.fsum`` and the quantiles by hand."""
    refused = [1.0] * 13 + [0.0] * 24
    draws, seed = 500, 7
    index = np.random.Generator(np.random.PCG64(seed)).integers(0, len(refused), size=(draws, len(refused)))
    means = [math.fsum(refused[i] for i in row) / len(refused) for row in index]
    low, high = m.bootstrap_interval(refused, draws=draws, seed=seed)
    assert low == pytest.approx(_quantile_by_hand(means, 0.025), abs=1e-12)
    assert high == pytest.approx(_quantile_by_hand(means, 0.975), abs=1e-12)
    low90, high90 = m.bootstrap_interval(refused, draws=draws, seed=seed, level=0.9)
    assert low90 == pytest.approx(_quantile_by_hand(means, 0.05), abs=1e-12) and low <= low90 <= high90 <= high
    assert isinstance(low, float) and isinstance(high, float)


def test_bootstrap_interval_is_deterministic_brackets_the_mean_and_narrows_with_prompts():
    rng = np.random.default_rng(3)
    few = (rng.random(40) < 0.4).astype(float)
    many = (rng.random(1600) < 0.4).astype(float)
    assert m.bootstrap_interval(few, seed=1) == m.bootstrap_interval(list(few), seed=1)
    spread_out = rng.random(40)  # 0/1 means fall on a grid of 1/40: another seed may read the same
    assert m.bootstrap_interval(spread_out, seed=1) != m.bootstrap_interval(spread_out, seed=2)
    for sample in (few, many):
        low, high = m.bootstrap_interval(sample)
        assert low < sample.mean() < high
    (low_few, high_few), (low_many, high_many) = m.bootstrap_interval(few), m.bootstrap_interval(many)
    width_few, width_many = high_few - low_few, high_many - low_many
    # about 2 * 1.96 * sqrt(p (1 - p) / n): 0.30 for 40 prompts, 0.048 for 1600
    assert 0.2 < width_few < 0.4 and 0.035 < width_many < 0.06 and width_many < width_few / 4
    assert m.bootstrap_interval([1.0] * 9) == (1.0, 1.0) and m.bootstrap_interval([0, 0, 0]) == (0.0, 0.0)
    for bad, kwargs in (([], {}), ([0.0, float("nan")], {}), ([1.0, 0.0], {"draws": 0}), ([1.0, 0.0], {"level": 1.0}),
                        ([[1.0, 0.0]], {})):
        with pytest.raises(ValueError):
            m.bootstrap_interval(bad, **kwargs)


def test_percentile_interval_reads_the_exact_quantiles():
    """Level 0.95 reads the 0.025 and 0.975 quantiles exactly (not 0.025000000000000022,
    what 1 - 0.95 gives), so results match ``np.quantile(x, [0.025, 0.975])`` bit for bit."""
    x = np.random.default_rng(11).random(1000)
    assert m.percentile_interval(x) == tuple(float(v) for v in np.quantile(x, [0.025, 0.975]))
    assert m.percentile_interval(x, 0.9) == tuple(float(v) for v in np.quantile(x, [0.05, 0.95]))
    assert m.percentile_interval(x, 0.5) == pytest.approx((_quantile_by_hand(x, 0.25), _quantile_by_hand(x, 0.75)))
    for bad, level in (([], 0.95), ([1.0, float("nan")], 0.95), ([1.0], 0.0), ([1.0], 1.5)):
        with pytest.raises(ValueError):
            m.percentile_interval(bad, level)


def test_split_halves_is_a_deterministic_disjoint_cover():
    for n in (2, 3, 10, 71):
        first, second = m.split_halves(list(range(n)), seed=0)
        assert sorted(first + second) == list(range(n)) and not set(first) & set(second)
        assert len(first) == n - n // 2 and len(second) == n // 2
        assert first == sorted(first) and second == sorted(second)
        assert (first, second) == m.split_halves(["x"] * n, seed=0)  # depends on the count only
    first, second = m.split_halves(range(100), seed=0)
    assert first != list(range(50)) and m.split_halves(range(100), seed=1) != (first, second)  # shuffled, by seed
    assert 15 < sum(i < 50 for i in first) < 35  # both halves draw from the whole list
    for n in (0, 1):
        with pytest.raises(ValueError):
            m.split_halves([None] * n)


def test_evenly_spaced_spans_the_set_from_first_to_last():
    items = list(range(313))
    picked = m.evenly_spaced(items, 157)
    assert picked == list(range(0, 313, 2))  # every other one: the testbed's StrongREJECT subset
    assert m.evenly_spaced(items, 5) == [0, 78, 156, 234, 312]  # round(i (len - 1) / (count - 1))
    assert m.evenly_spaced(items[:72], 72) == items[:72] and m.evenly_spaced(items[:72], 100) == items[:72]
    assert m.evenly_spaced(items, 1) == [0] and m.evenly_spaced(items, 0) == []


# -- where the measures live ----------------------------------------------------------


def _imports(path):
    with open(path, encoding="utf-8") as fp:
        tree = ast.parse(fp.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")


def test_measure_imports_no_mergekit_and_no_package_module():
    names = list(_imports(os.path.join(ROOT, "mergekit_lssf", "measure.py")))
    assert "torch" in names and "numpy" in names  # the parser sees the imports
    assert not [n for n in names if n == "mergekit" or n.startswith(("mergekit.", "mergekit_lssf", "."))]


def test_the_testbed_keeps_no_copy_of_a_measure():
    """No testbed module defines a function of measure's name; the testbed imports them."""
    public = {n for n, v in vars(m).items() if callable(v) and not n.startswith("_") and getattr(v, "__module__", "") == m.__name__}
    assert {"row_nll", "utility_kept", "won_back", "at_budget", "bootstrap_interval", "is_refusal"} <= public
    folder = os.path.join(ROOT, "benchmarks", "lssf_testbed")
    defined, uses = {}, set()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), encoding="utf-8") as fp:
                tree = ast.parse(fp.read())
            defined[name] = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            uses |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "mergekit_lssf.measure"
                     for a in n.names}
    assert {f: d & public for f, d in defined.items() if d & public} == {}
    assert {"row_nll", "utility_kept", "won_back", "at_budget", "bootstrap_interval", "refusal_rate",
            "evenly_spaced"} <= uses
