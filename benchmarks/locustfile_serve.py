"""Locust users for `benchmarks/load_test.py`: good and bad `POST /predict` requests against `querytune serve`.

Run by load_test.py as `python -m locust -f benchmarks/locustfile_serve.py --headless ...` (never imported by
querytune or its tests: gevent patches the process that imports locust). Its inputs come from the environment:
QT_LOAD_CASES (a JSON file: the run name, queries with the label `querytune predict` gives each, the server's
limits) and QT_LOAD_OUT (where this file's own record is written when the test stops).

Every request is named by its kind. A good request succeeds when it gets 200 and, for each of its queries in order,
the query echoed back with the expected label; a bad one succeeds when it gets the status the API promises for it.
The record counts, per kind, the requests sent (before each is sent), the outcomes and every response time: locust's
own CSV statistics are written on a timer and can miss the last requests of a run, and the load test compares the
counts exactly with the server's.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter

from locust import HttpUser, between, events, task

CASES = json.loads(open(os.environ["QT_LOAD_CASES"]).read())
RUN = CASES["run"]
QUERIES: list[str] = CASES["queries"]
EXPECTED: dict[str, str] = CASES["expected"]
LIMITS: dict[str, int] = CASES["limits"]
WAIT_S = float(os.environ.get("QT_LOAD_WAIT_S", "0"))
OUTCOMES: Counter[str] = Counter()  # "<kind> <outcome>" -> count
SENT: Counter[str] = Counter()  # kind -> requests sent
LATENCY_MS: dict[str, list[float]] = {}  # kind -> the response time of every request that completed
JSON = {"content-type": "application/json"}

# Bad requests: kind -> (raw JSON body, the status the API must answer with)
BAD = {
    "bad: empty query": (json.dumps({"queries": ["   "]}), 422),
    "bad: lone surrogate": (json.dumps({"queries": ["track \ud800 package"]}), 422),
    "bad: zero-width only": (json.dumps({"queries": ["\u200b\u200c"]}), 422),
    "bad: top_k string": (json.dumps({"queries": [QUERIES[0]], "top_k": "3"}), 422),
    "bad: unknown field": (json.dumps({"queries": [QUERIES[0]], "topk": 3}), 422),
    "bad: malformed JSON": ('{"queries": ["cheap shoes"', 422),
    "bad: query too long": (json.dumps({"queries": ["x" * (LIMITS["max_query_chars"] + 1)]}), 422),
    "bad: too many queries": (json.dumps({"queries": [QUERIES[0]] * (LIMITS["max_queries_per_request"] + 1)}), 413),
    "bad: body too large": (json.dumps({"queries": ["y" * (LIMITS["max_body_bytes"] + 1)]}), 413),
    "bad: unknown run": (json.dumps({"queries": [QUERIES[0]], "runs": ["nope"]}), 404),
}


class Client(HttpUser):
    wait_time = between(0, WAIT_S)

    @task(len(BAD))  # half of the requests are good, half are bad
    def good(self) -> None:
        queries = random.sample(QUERIES, random.randint(1, 4))
        SENT["good"] += 1
        with self.client.post("/predict", data=json.dumps({"queries": queries, "runs": [RUN]}), headers=JSON,
                              name="good", catch_response=True) as response:  # fmt: skip
            if response.status_code != 200:
                OUTCOMES["good wrong status"] += 1
                response.failure(f"status {response.status_code}")
                return
            results = response.json()["results"]
            answered = [(r["query"], r["predictions"][RUN]["label"]) for r in results]
            if answered == [(q, EXPECTED[q]) for q in queries]:
                OUTCOMES["good right"] += 1
                response.success()
            elif [q for q, _ in answered] != queries:
                OUTCOMES["good other queries"] += 1  # an answer to another request: never acceptable
                response.failure("the answer is not for these queries")
            else:
                OUTCOMES["good wrong label"] += 1
                response.failure("a label differs from `querytune predict`")

    @task(len(BAD))
    def bad(self) -> None:
        kind = random.choice(list(BAD))
        body, status = BAD[kind]
        SENT[kind] += 1
        with self.client.post("/predict", data=body.encode(), headers=JSON, name=kind,
                              catch_response=True) as response:  # fmt: skip
            if response.status_code == status and "error" in response.json():
                OUTCOMES[f"{kind} expected status"] += 1
                response.success()
            else:
                OUTCOMES[f"{kind} status {response.status_code}"] += 1
                response.failure(f"expected {status}, got {response.status_code}")


@events.request.add_listener
def _record(request_type, name, response_time, response_length, response=None, exception=None,
                            **kw) -> None:  # fmt: skip
    LATENCY_MS.setdefault(name, []).append(response_time)
    if exception is not None and (response is None or response.status_code == 0):
        OUTCOMES[f"{name} no response"] += 1


@events.test_stop.add_listener
def _write_outcomes(environment, **kw) -> None:
    with open(os.environ["QT_LOAD_OUT"], "w") as fh:
        json.dump({"sent": dict(SENT), "outcomes": dict(OUTCOMES), "latency_ms": LATENCY_MS}, fh)
