"""A rewrite run's `predict --top_k k` widens its search until k distinct rewrites that are not copies of the query
are found (up to 32 beams or samples), and says so when fewer remain; before, it could answer `"rewrites": []`."""

from __future__ import annotations

import json

import pytest

from querytune.cli import main
from querytune.inference import LoadedRun
from querytune.tasks.rewrite.task import MAX_SEARCH

from .test_rewrite import _train, conv_data, tiny_gen_models  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def rewrite_run(tmp_path_factory, tiny_gen_models, conv_data):  # noqa: F811
    tmp = tmp_path_factory.mktemp("rewrite_search")
    return _train(tmp, tiny_gen_models["llama"], conv_data, method="lora").output_dir


def _stub(task, distinct_from: int | None):
    """Replace the model's decoding: every sequence copies the query until the search is `distinct_from` wide."""
    widths: list[int] = []

    def raw_candidates(model, tokenizer, prompts, batch_size, kwargs):
        n = kwargs["num_return_sequences"]
        widths.append(n)
        query = "is it treatable ?"
        if distinct_from is None or n < distinct_from:
            return [[query, query.upper(), f"  {query} "][:n] + [query] * (n - 3) for _ in prompts]
        return [[query] + [f"is throat cancer treatable ? {i}" for i in range(n - 1)] for _ in prompts]

    task.raw_candidates = raw_candidates
    return widths


@pytest.mark.parametrize(("generation", "first_width"), [("greedy", 1), ("beam", 4), ("sample", 7)])
def test_the_search_widens_until_k_distinct_non_copies(rewrite_run, generation, first_width):
    loaded = LoadedRun(rewrite_run)
    loaded.task.args.rewrite_generation = generation
    k = 1 if generation == "greedy" else 3
    widths = _stub(loaded.task, distinct_from=16)
    [result] = loaded.predict(["is it treatable ?"], top_k=k)
    assert result["rewrites"] == [f"is throat cancer treatable ? {i}" for i in range(k)] and "note" not in result
    assert widths[0] == first_width and widths[-1] >= 16 and widths == sorted(widths)


def test_fewer_than_k_after_the_widest_search_is_said(rewrite_run):
    loaded = LoadedRun(rewrite_run)
    loaded.task.args.rewrite_generation = "beam"
    widths = _stub(loaded.task, distinct_from=None)
    [result] = loaded.predict(["is it treatable ?"], top_k=3)
    assert result["rewrites"] == [] and widths[-1] == MAX_SEARCH
    assert (
        result["note"]
        == f"0 of 3 rewrites: the other candidates of {MAX_SEARCH} beams were a copy of the query or repeats"
    )


def test_predict_on_a_real_run_never_returns_copies_without_saying_so(rewrite_run, capsys):
    assert main(["predict", str(rewrite_run), "what is lung cancer ? ||| is it treatable ?", "cheap red shoes",
                 "--top_k", "3"]) == 0  # fmt: skip
    for line in capsys.readouterr().out.splitlines():
        result = json.loads(line)
        norm = [" ".join(r.lower().split()) for r in result["rewrites"]]
        assert " ".join(result["query"].lower().split()) not in norm and len(set(norm)) == len(norm)
        assert len(norm) == 3 or result["note"].startswith(f"{len(norm)} of 3 rewrites")
