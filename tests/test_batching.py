"""Length-sorted inference batching: queries tokenised once, sorted by token count and cut into batches, every
result put back at its query's place, in `predict` and in the server's micro-batcher (live on loopback)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from querytune.batching import arrival_batches, encoded_batches, padding_waste, sorted_batches
from querytune.cli import main
from querytune.inference import LoadedRun
from querytune.models import load_tokenizer

from .conftest import tiny_experiment
from .test_serve import start_server, stop_server

# Lengths that differ a lot and are not in order: sorting has to move them.
QUERIES = ["best laptop under 40 dollars for kids", "cheap shoes", "where is my order 5", "lamp",
           "exchange jacket for size 12 store near 7", "return my lamp", "store hours 3", "track package 77 order",
           "refund for tent", "red sofa"]  # fmt: skip


@pytest.fixture(scope="module")
def intent_run(tmp_path_factory, tiny_bert, tiny_data):
    tmp = tmp_path_factory.mktemp("batching_run")
    assert main(["train", str(tiny_experiment(tmp, tiny_bert, tiny_data, method="full", max_steps=4))]) == 0
    return tmp / "run"


def test_padding_waste_counts_padding_tokens_per_real_token():
    lengths = [2, 5, 2, 5]
    assert padding_waste(lengths, arrival_batches(4, 2)) == pytest.approx(6 / 14)  # each 2 is padded to 5
    assert list(sorted_batches(lengths, 2)) == [[0, 2], [1, 3]]
    assert padding_waste(lengths, list(sorted_batches(lengths, 2))) == 0.0
    assert padding_waste(lengths, arrival_batches(4, 4)) == pytest.approx(6 / 14)
    assert list(sorted_batches([3, 1, 2, 1], 3)) == [[1, 3, 2], [0]]  # stable: ties keep their order


def test_encoded_batches_sort_by_token_count_and_cover_every_query(tiny_bert):
    tokenizer = load_tokenizer(str(tiny_bert))
    counts = [len(ids) for ids in tokenizer(QUERIES)["input_ids"]]
    seen, widths = [], []
    for idx, enc in encoded_batches(tokenizer, QUERIES, None, batch_size=3, max_length=32):
        assert enc["input_ids"].shape == enc["attention_mask"].shape == (len(idx), max(counts[i] for i in idx))
        assert enc["attention_mask"].sum(1).tolist() == [counts[i] for i in idx]
        seen += idx
        widths.append(enc["input_ids"].shape[1])
    assert sorted(seen) == list(range(len(QUERIES))) and widths == sorted(widths)
    sorted_waste = padding_waste(counts, list(sorted_batches(counts, 3)))
    assert sorted_waste < padding_waste(counts, arrival_batches(len(QUERIES), 3))
    # windows: a long input is sorted window by window, and still comes back whole
    many = QUERIES * 30
    assert sorted(i for idx, _ in encoded_batches(tokenizer, many, None, 2, 32) for i in idx) == list(range(300))


def test_predict_in_sorted_batches_keeps_the_order_of_the_queries(intent_run):
    loaded = LoadedRun(intent_run)
    one_by_one = [loaded.predict([q], top_k=2)[0] for q in QUERIES]
    for batch_size in (2, 3, 64):
        got = loaded.predict(QUERIES, top_k=2, batch_size=batch_size)
        assert [r["query"] for r in got] == QUERIES
        for a, b in zip(got, one_by_one, strict=True):
            assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_server_cuts_queued_queries_into_sorted_model_batches_and_answers_in_order(intent_run, tmp_path):
    """Concurrent requests of mixed-length queries are collected into one batch (200 ms window), scored in model
    batches of 2 sorted by length, and each request gets its own queries back, in its order, as predict scores them."""
    proc, url = start_server([f"intent={intent_run}", "--model_batch_size", "2", "--max_wait_ms", "200"],
                             tmp_path / "log")  # fmt: skip
    try:
        requests = [QUERIES[i : i + 3] for i in range(0, len(QUERIES), 3)] + [QUERIES[::-1][:4]]

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/predict", json={"queries": q, "top_k": 1})
                                              for q in requests))  # fmt: skip

        responses = asyncio.run(fire())
        expected = {r["query"]: r for r in LoadedRun(intent_run).predict(QUERIES, top_k=1)}
        for queries, response in zip(requests, responses, strict=True):
            assert response.status_code == 200, response.text
            results = response.json()["results"]
            assert [r["query"] for r in results] == queries
            for r in results:
                got, want = r["predictions"]["intent"], expected[r["query"]]
                assert got["label"] == want["label"] and got["score"] == pytest.approx(want["score"], abs=1e-5)
        metrics = httpx.get(f"{url}/metrics").text
        calls = sum(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith('querytune_batch_size_count{run="intent"}'))  # fmt: skip
        assert calls < len(requests), "the requests were not collected into shared batches"
    finally:
        assert stop_server(proc) == 0
    with pytest.raises(SystemExit) as refused:  # argparse: a usage error names the flag, exit code 2
        main(["serve", str(intent_run), "--model_batch_size", "0", "--port", "1"])
    assert refused.value.code == 2
