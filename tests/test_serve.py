"""`m2rec serve` over HTTP with a real client (httpx), against a server process started on a free port: answers equal
`m2rec predict`, appending equals the stateless call with the whole list, bad requests get 4xx, concurrent clients
get consistent answers. Plus the `Recommender` behind it, in-process, in the window mode."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
import pytest
import torch
from test_cli import m2rec, write_config

from m2rec_lightning.serve import (
    RecommendRequest,
    RequestError,
    ServeSpec,
    UserRequest,
    build_recommender,
    resolve_checkpoint,
)

MAX_LEN = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, pd.DataFrame, dict]:
    """A fitted text-reading M2Rec (max_len 8; histories of 6-10 items), its predictions and sequences by user."""
    tmp = tmp_path_factory.mktemp("serve")
    config = write_config(tmp, max_epochs=2)
    m2rec("fit", "--config", str(config), cwd=tmp)
    m2rec("predict", "--config", str(config), "--ckpt_path", "best", cwd=tmp)
    sequences = {}
    for line in (tmp / "seqs.txt").read_text().splitlines():
        user, *items = line.split()
        sequences[int(user)] = [int(i) for i in items]
    return tmp, config, pd.read_parquet(tmp / "runs" / "top.parquet"), sequences


@pytest.fixture(scope="module")
def server(trained):
    tmp, config, _, _ = trained
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "m2rec_lightning.cli", "serve", "--config", str(config),
                             "--ckpt_path", "best", "--port", str(port), "--max_items", "50", "--history", "whole"],
                            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stderr.read().decode()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy in 240 s"
            time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def predicted(predictions: pd.DataFrame, user: int) -> list[int]:
    return predictions[predictions["user_id"] == user].sort_values("rank")["item_id"].tolist()


def test_answers_equal_m2rec_predict(server, trained):
    """For histories within max_len, the whole-history (recurrent) server reads what predict reads: the same top-5.
    (The default, history "window", equals predict for every history: the in-process test below.)"""
    _, _, predictions, sequences = trained
    users = [u for u, s in sequences.items() if len(s) <= MAX_LEN][:20]
    assert len(users) >= 10
    for user in users:
        stateless = server.post("/recommend", json={"items": sequences[user], "k": 5})
        assert stateless.status_code == 200, stateless.text
        assert stateless.json()["items"] == predicted(predictions, user)
        known = server.post("/users", json={"user": user, "k": 5})
        assert known.status_code == 200, known.text
        assert known.json() == stateless.json()


def test_appending_equals_the_stateless_call_with_the_whole_list(server, trained):
    _, _, _, sequences = trained
    user = next(u for u, s in sequences.items() if len(s) == 10)  # longer than max_len: read whole
    history = list(sequences[user])
    for new in ([1003], [1010, 1011], [1001]):
        appended = server.post("/users", json={"user": user, "append": new, "k": 7})
        history += new
        stateless = server.post("/recommend", json={"items": history, "k": 7})
        assert appended.status_code == stateless.status_code == 200
        assert appended.json()["items"] == stateless.json()["items"]
        assert appended.json()["scores"] == pytest.approx(stateless.json()["scores"], abs=1e-5)
    # a user the training data does not know starts from nothing
    first = server.post("/users", json={"user": "visitor-1", "append": [1002, 1005]})
    assert first.status_code == 200
    assert first.json() == server.post("/recommend", json={"items": [1002, 1005]}).json()


def test_options_exclude_seen_and_candidates(server, trained):
    _, _, _, sequences = trained
    history = sequences[5000]
    excluded = server.post("/recommend", json={"items": history, "k": 10, "exclude_seen": True}).json()["items"]
    assert len(excluded) == 10 and not set(excluded) & set(history)
    candidates = [1001, 1002, 1003, 1030, history[0]]
    ranked = server.post("/recommend", json={"items": history, "k": 3, "candidates": candidates}).json()
    assert len(ranked["items"]) == 3 and set(ranked["items"]) <= set(candidates)
    assert ranked["scores"] == sorted(ranked["scores"], reverse=True)
    # the whole-catalogue list ranks the candidates in the same order, with the same scores
    full = server.post("/recommend", json={"items": history, "k": 40}).json()
    order = [i for i in full["items"] if i in candidates][:3]
    assert ranked["items"] == order


@pytest.mark.parametrize("path, body, status, words", [
    ("/recommend", {"items": [1001, 99]}, 400, "unknown item id(s) 99"),
    ("/recommend", {"items": []}, 400, "items is empty"),
    ("/recommend", {"items": [1001], "k": 0}, 400, "k must be in [1, 40]"),
    ("/recommend", {"items": [1001], "candidates": [7]}, 400, "candidates: unknown item id(s) 7"),
    ("/recommend", {"items": [1001] * 51}, 413, "more than the server's limit of 50"),
    ("/users", {"user": "nobody"}, 404, "unknown user 'nobody'"),
    ("/users", {"user": 5000, "append": ["x"]}, 400, "append: unknown item id(s) 'x'"),
])
def test_bad_requests_get_4xx_with_a_message(server, path, body, status, words):
    response = server.post(path, json=body)
    assert response.status_code == status
    assert words in response.json()["error"]


def test_malformed_requests_get_4xx_and_the_server_stays_up(server):
    for path in ("/recommend", "/users"):
        assert server.post(path, content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
        assert server.post(path, json={"wrong": 1}).status_code == 422
        assert server.post(path, json={"items": "1001", "user": {"a": 1}}).status_code == 422
    assert server.get("/health").status_code == 200
    assert server.post("/recommend", json={"items": [1001]}).status_code == 200


def test_concurrent_clients_get_consistent_answers(server, trained):
    """Stateless calls from many threads (batched together by the server) answer as one call alone; a bad request
    among them fails alone; concurrent appends of distinct users each end where their own sequence says."""
    _, _, _, sequences = trained
    users = list(sequences)[:24]
    alone = {u: server.post("/recommend", json={"items": sequences[u], "k": 5}).json() for u in users}

    def ask(u):
        if u is None:
            return server.post("/recommend", json={"items": [1, 2]})
        return server.post("/recommend", json={"items": sequences[u], "k": 5})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, users * 3 + [None] * 4))
    for u, answer in zip(users * 3, answers):
        assert answer.status_code == 200 and answer.json()["items"] == alone[u]["items"]
        assert answer.json()["scores"] == pytest.approx(alone[u]["scores"], abs=1e-5)
    assert all(a.status_code == 400 for a in answers[-4:])

    def append(u):
        out = None
        for item in (1001, 1002, 1003):
            out = server.post("/users", json={"user": f"live-{u}", "append": [item], "k": 5})
        return out

    with ThreadPoolExecutor(12) as pool:
        finals = list(pool.map(append, range(12)))
    expected = server.post("/recommend", json={"items": [1001, 1002, 1003], "k": 5}).json()
    for final in finals:
        assert final.status_code == 200 and final.json()["items"] == expected["items"]


def test_window_mode_equals_predict_for_every_history(trained):
    """history="window" reads the last max_len items, as predict does, also for histories longer than that; "whole"
    reads those differently."""
    tmp, config, predictions, sequences = trained
    cwd = os.getcwd()
    os.chdir(tmp)  # the config's best checkpoint is found as `m2rec serve` finds it
    try:
        ckpt = resolve_checkpoint(["--config", str(config)], "best", tmp)
        window = build_recommender(ServeSpec(["--config", str(config)], ckpt, history="window"))
        whole = build_recommender(ServeSpec(["--config", str(config)], ckpt, history="whole"))
    finally:
        os.chdir(cwd)
    long_users = [u for u, s in sequences.items() if len(s) > MAX_LEN]
    assert len(long_users) >= 20
    answers = window.recommend([window.query(RecommendRequest(items=sequences[u], k=5)) for u in long_users])
    for u, answer in zip(long_users, answers):
        assert answer["items"] == predicted(predictions, u)
    wholes = whole.recommend([whole.query(RecommendRequest(items=sequences[u], k=5)) for u in long_users])
    # reading the whole history changes every long user's scores (their top items may still agree: the extra items
    # are few and far back)
    assert all(a["scores"] != pytest.approx(b["scores"], abs=1e-6) for a, b in zip(answers, wholes))
    known = window.users_step([window.query(UserRequest(user=long_users[0], k=5))])[0]  # a batch of one: rounding
    assert known["items"] == answers[0]["items"] and known["scores"] == pytest.approx(answers[0]["scores"], abs=1e-5)
    with pytest.raises(RequestError, match="unknown user"):
        window.query(UserRequest(user="nobody"))


def tiny_recommender(encoder_cls, history, max_users=100_000, **options):
    import numpy as np

    from m2rec_lightning import SequentialRecommender
    from m2rec_lightning.serve import Recommender

    torch.manual_seed(0)
    model = SequentialRecommender(lambda n, t: encoder_cls(n, t, hidden_size=16, max_len=MAX_LEN, **options),
                                  num_items=30)
    items = np.array([-1] + [100 + i for i in range(30)])
    return Recommender(model, items, np.array([7]), lambda u: np.arange(1, 13), history=history, max_users=max_users)


def assert_same_answer(got: dict, expected: dict) -> None:
    assert got["items"] == expected["items"]
    assert got["scores"] == pytest.approx(expected["scores"], abs=1e-5)


@pytest.mark.parametrize("encoder", ["m2rec", "sasrec"])
def test_live_users_answer_as_their_whole_history_in_batches(encoder):
    """history "whole" keeps users' states in a pool of slots: batches of new, known and repeated users (a user asked
    twice in a batch sees the first request's appends) answer as the stateless call with each user's whole history."""
    import random

    from m2rec_lightning import M2RecEncoder, SASRecEncoder

    r = (tiny_recommender(M2RecEncoder, "whole", mamba_backend="torch") if encoder == "m2rec"
         else tiny_recommender(SASRecEncoder, "whole"))
    rng = random.Random(0)
    expected = {"7": [100 + i for i in range(12)]}  # the training user's sequence (internal ids 1..12), raw ids
    for _ in range(6):
        batch = [UserRequest(user=rng.choice([7, "a", "b", "c"]), append=rng.sample(range(100, 130), rng.randint(1, 3)),
                             k=5) for _ in range(6)]
        histories = []
        for request in batch:
            expected.setdefault(str(request.user), []).extend(request.append)
            histories.append(list(expected[str(request.user)]))
        for request, history, answer in zip(batch, histories, r.users_step([r.query(q) for q in batch])):
            assert_same_answer(answer, r.recommend([r.query(RecommendRequest(items=history, k=5))])[0])
    assert r.pool.size == 4  # one slot per user


def test_live_users_beyond_max_users_are_dropped_and_their_slots_reused():
    """With fewer users kept than asked, the least recently used are dropped (and start again when they come back);
    users dropped within a batch are still answered, and the pool stays within max_users plus a batch."""
    import random
    from collections import OrderedDict

    from m2rec_lightning import M2RecEncoder

    r = tiny_recommender(M2RecEncoder, "whole", max_users=3, mamba_backend="torch")
    rng = random.Random(1)
    kept: OrderedDict[str, list[int]] = OrderedDict()  # what the server should keep, least recently used first
    for _ in range(8):
        users = rng.sample([7, "a", "b", "c", "d", "e"], 4)  # distinct: one round, in request order
        batch = [UserRequest(user=u, append=rng.sample(range(100, 130), rng.randint(1, 2)), k=5) for u in users]
        histories = []
        for request in batch:
            key = str(request.user)
            history = kept.pop(key, [100 + i for i in range(12)] if key == "7" else [])
            kept[key] = history + request.append
            histories.append(kept[key])
            while len(kept) > 3:
                kept.popitem(last=False)
        for history, answer in zip(histories, r.users_step([r.query(q) for q in batch])):
            assert_same_answer(answer, r.recommend([r.query(RecommendRequest(items=history, k=5))])[0])
        assert list(r.users) == list(kept)
        assert r.pool.size <= 3 + 4


def test_sasrec_reads_its_last_max_len_items_in_both_modes():
    from m2rec_lightning import SASRecEncoder

    history = [100 + i % 30 for i in range(3, 15)]  # 12 items > max_len
    answers = []
    for mode in ("whole", "window"):
        r = tiny_recommender(SASRecEncoder, mode)
        answers.append(r.recommend([r.query(RecommendRequest(items=history, k=5))])[0])
        # the live user of the training data (12 items) steps past its position table: still the last window
        stepped = r.users_step([r.query(UserRequest(user=7, append=[105, 106], k=5))])[0]
        again = r.recommend([r.query(RecommendRequest(items=[100 + i for i in range(1, 13)] + [105, 106], k=5))])[0]
        assert stepped["items"] == again["items"]
    assert answers[0]["items"] == answers[1]["items"]
    assert answers[0]["scores"] == pytest.approx(answers[1]["scores"], abs=1e-5)


def test_an_encoder_without_a_state_is_served_in_window_mode_only():
    from torch import nn

    from m2rec_lightning.models.encoder import SequenceEncoder

    class GRU(SequenceEncoder):
        def __init__(self, num_items, text_dim=0, hidden_size=16, max_len=MAX_LEN):
            super().__init__()
            self.hidden_size, self.max_len = hidden_size, max_len
            self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)
            self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)

        def forward(self, input_ids):
            return self.gru(self.item_embedding(input_ids))[0]

        def item_embeddings(self):
            return self.item_embedding.weight

    with pytest.raises(ValueError, match="no recurrent state .* --history window"):
        tiny_recommender(GRU, "whole")
    r = tiny_recommender(GRU, "window")
    assert len(r.recommend([r.query(RecommendRequest(items=[101, 102], k=3))])[0]["items"]) == 3


def test_candidates_with_exclude_seen_leave_out_the_history():
    from m2rec_lightning import M2RecEncoder

    r = tiny_recommender(M2RecEncoder, "window", mamba_backend="torch")
    history, candidates = [101, 102, 103], [101, 102, 110, 111]
    kept = r.recommend([r.query(RecommendRequest(items=history, k=4, candidates=candidates, exclude_seen=True)),
                        r.query(RecommendRequest(items=history, k=4, candidates=candidates))])
    assert sorted(kept[0]["items"]) == [110, 111]
    assert sorted(kept[1]["items"]) == sorted(candidates)


def test_a_visitor_whose_first_append_is_refused_stays_unknown():
    from m2rec_lightning import M2RecEncoder

    r = tiny_recommender(M2RecEncoder, "whole", mamba_backend="torch")
    r.max_history = 2
    refused = r.users_step([r.query(UserRequest(user="v", append=[101, 102, 103]))])[0]
    assert isinstance(refused, RequestError) and refused.status == 413
    with pytest.raises(RequestError, match="unknown user 'v'"):  # a 404, not a ranking of no history
        r.query(UserRequest(user="v"))
