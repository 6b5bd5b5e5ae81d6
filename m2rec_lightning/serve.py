"""`m2rec serve`: a trained checkpoint answering top-K requests over HTTP, in raw ids, with LitServe.

Two endpoints, each a LitServe API with dynamic batching (concurrent requests that arrive within `batch_timeout` are
encoded and ranked together):

    POST /recommend  {"items": [raw item ids, oldest first], "k": 10, "exclude_seen": false, "candidates": null}
        top-K for a history given in the request (a new user, or a stateless call); nothing is kept.
    POST /users      {"user": "raw user id", "append": [raw item ids], "k": 10, ...}
        top-K for a user whose history the server keeps: a user of the training data starts from their whole
        sequence, any other id from nothing; `append` adds interactions first (with history "whole" the recurrent
        state is carried forward one item at a time). Users live in memory, least recently used evicted.
    GET /health      "ok" once the model is loaded.

How a history is read (`history`): "window" (default) encodes the last `max_len` items with the parallel forward,
as training and `m2rec predict` do, so an append costs one encoding of at most `max_len` items, whatever the history's
length; "whole" carries the encoder's recurrent state (`encode_state` / `step`), so an append costs one step and a
history longer than `max_len` is read whole. For histories of at most `max_len` items the two give the same scores.
The default is the window because that is what the model was trained on and what measured best where they differ
(experiments/results/ml-1m/long_history_ml-1m.md). SASRec's state is a key/value cache bounded by its position table,
so it reads the last `max_len` items in both modes.

Bad requests get a 4xx answer with a message (unknown items or user, an empty history, too many items, a bad k or
candidate list); they never stop the server, and one bad request in a batch does not fail the others.
"""

import argparse
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import litserve as ls
import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import Tensor

from .models.encoder import SequenceEncoder
from .models.sasrec import SASRecEncoder
from .models.state import StatePool
from .ops.chunked_softmax import chunked_rank_and_top_k

History = Literal["whole", "window"]


class RequestError(ValueError):
    """A request the server refuses: its HTTP status and a message that says what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RecommendRequest(BaseModel):
    """POST /recommend: a history given in the request."""

    items: list[int | str] = Field(description="raw item ids, oldest first")
    k: int | None = Field(None, description="list length (default: the model's top_k)")
    exclude_seen: bool | None = Field(None, description="leave out the history's items (default: the model's)")
    candidates: list[int | str] | None = Field(None, description="rank only these raw item ids")


class UserRequest(BaseModel):
    """POST /users: a user whose history the server keeps, optionally with new interactions."""

    user: int | str
    append: list[int | str] = Field(default_factory=list, description="new interactions, oldest first")
    k: int | None = None
    exclude_seen: bool | None = None
    candidates: list[int | str] | None = None


@dataclass
class Query:
    """One request after checking, in internal ids."""

    k: int
    exclude_seen: bool
    candidates: Tensor | None  # (C,) internal ids
    history: list[int] = field(default_factory=list)  # the items the answer is for, oldest first
    user: str | None = None
    append: list[int] = field(default_factory=list)


@dataclass
class LiveUser:
    """A user the server keeps: the history in internal ids, and (history "whole") the slot of the `Recommender`'s
    state pool that holds the encoder's state after it and the hidden vector at its last item (None until the user's
    first step or prefill)."""

    history: list[int]
    slot: int | None = None


class Recommender:
    """A trained module over its catalogue, answering in raw ids; used by both endpoints.

    Args:
        model: the trained `SequentialRecommender` (put in eval mode here).
        item_ids: (N+1,) raw id of each internal item id (index 0 = padding), from the datamodule.
        user_ids: (U,) raw id of each training user, and `sequence(u)` their internal ids, oldest first.
        history: "whole" or "window" (see the module docstring).
        max_users: live users kept in memory; the least recently used is dropped beyond this.
        max_items: most items one request may carry (its history, appended items or candidates).
        max_history: most items the server keeps for one live user.
    """

    def __init__(self, model, item_ids: np.ndarray, user_ids: np.ndarray, sequence, history: History = "window",
                 max_users: int = 100_000, max_items: int = 10_000, max_history: int = 100_000) -> None:
        if history not in ("whole", "window"):
            raise ValueError(f"history must be 'whole' or 'window', got {history!r}")
        self.model = model.eval()
        self.encoder: SequenceEncoder = model.encoder
        if history == "whole" and type(self.encoder).encode_state is SequenceEncoder.encode_state:
            raise ValueError(f"{type(self.encoder).__name__} has no recurrent state (encode_state / step): serve it "
                             "with --history window")
        # SASRec's state is bounded by its position table: it reads the last max_len items in both modes
        self.bounded = isinstance(self.encoder, SASRecEncoder)
        self.history_mode = history
        self.max_users, self.max_items, self.max_history = max_users, max_items, max_history
        self.max_len = getattr(self.encoder, "max_len", None)
        self.num_items = len(item_ids) - 1
        self.raw_items = item_ids
        self.item_index = {str(raw): i for i, raw in enumerate(item_ids.tolist()) if i > 0}
        self.user_index = {str(raw): u for u, raw in enumerate(user_ids.tolist())}
        self.sequence = sequence
        self.users: OrderedDict[str, LiveUser] = OrderedDict()
        with torch.inference_mode():
            self.table = model.encoder.item_embeddings().detach()  # (N+1, d), frozen while serving
        # history "whole": every live user's [state, hidden (d,)] in one pool, so a batch of users is gathered and
        # scattered in one op per state tensor. The slots of users dropped in a round are given back at the next
        # round: a user may be dropped by a later user of the same round while still being answered
        self.pool = StatePool(lambda n: [self.encoder.init_state(n), self.table.new_zeros(n, self.table.size(1))],
                              max_users) if history == "whole" else None
        self.dropped: list[LiveUser] = []

    # ---- requests -> queries ---------------------------------------------------------------------------------------
    def items(self, raw: Sequence[int | str], what: str) -> list[int]:
        if len(raw) > self.max_items:
            raise RequestError(413, f"{what}: {len(raw):,} items, more than the server's limit of {self.max_items:,}")
        ids = [self.item_index.get(str(r)) for r in raw]
        unknown = [r for r, i in zip(raw, ids) if i is None]
        if unknown:
            shown = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise RequestError(400, f"{what}: unknown item id(s) {shown} (not in the model's catalogue)")
        return ids

    def query(self, request: RecommendRequest | UserRequest) -> Query:
        k = self.model.hparams.top_k if request.k is None else request.k
        if not 1 <= k <= self.num_items:
            raise RequestError(400, f"k must be in [1, {self.num_items:,}] (the catalogue), got {k}")
        exclude = self.model.hparams.exclude_seen if request.exclude_seen is None else request.exclude_seen
        candidates = None
        if request.candidates is not None:
            if not request.candidates:
                raise RequestError(400, "candidates is an empty list; leave it out to rank the whole catalogue")
            candidates = torch.tensor(sorted(set(self.items(request.candidates, "candidates"))))
        query = Query(k=k, exclude_seen=exclude, candidates=candidates)
        if isinstance(request, RecommendRequest):
            if not request.items:
                raise RequestError(400, "items is empty: give at least one item of the history")
            query.history = self.items(request.items, "items")
            return query
        query.user, query.append = str(request.user), self.items(request.append, "append")
        live = self.users.get(query.user)
        if (live is None or not live.history) and query.user not in self.user_index and not query.append:
            raise RequestError(404, f"unknown user {request.user!r}: not in the training data and nothing appended "
                                    "yet; send items to append, or use /recommend with a history")
        return query

    # ---- encoding ----------------------------------------------------------------------------------------------------
    def _padded(self, histories: list[list[int]]) -> Tensor:
        width = max(len(h) for h in histories)
        out = torch.zeros(len(histories), width, dtype=torch.long)
        for row, h in enumerate(histories):
            out[row, : len(h)] = torch.tensor(h)
        return out

    def _window(self, history: list[int]) -> list[int]:
        return history[-self.max_len:] if self.max_len else history

    def _encode(self, histories: list[list[int]]) -> tuple[Any, Tensor]:
        """(state or None, (B, d) hidden at each history's last item), as the history mode reads them."""
        if self.history_mode == "window":
            # one call, not predict's length groups: a serving batch is small, and each group repeats every op's fixed
            # cost (at batch 10, four groups cost three times one)
            return None, self.encoder.forward_last(self._padded([self._window(h) for h in histories]))
        return self.encoder.encode_state(self._padded([self._window(h) if self.bounded else h for h in histories]))

    @torch.inference_mode()
    def recommend(self, queries: list[Query]) -> list[dict]:
        """Stateless queries, encoded as one batch."""
        _, hidden = self._encode([q.history for q in queries])
        return self._rank(queries, hidden)

    @torch.inference_mode()
    def users_step(self, queries: list[Query]) -> list[dict | RequestError]:
        """Live-user queries, answered in order; a user asked twice in one batch sees their earlier appends."""
        answers: list[dict | None] = [None] * len(queries)
        pending = list(range(len(queries)))
        while pending:  # rounds in which every user appears at most once
            seen, now, later = set(), [], []
            for i in pending:
                (later if queries[i].user in seen else now).append(i)
                seen.add(queries[i].user)
            for i, answer in zip(now, self._users_round([queries[i] for i in now])):
                answers[i] = answer
            pending = later
        return answers

    def _users_round(self, queries: list[Query]) -> list[dict | RequestError]:
        if self.dropped:
            self.pool.give([user.slot for user in self.dropped if user.slot is not None])
            self.dropped = []
        live = [self._live(q) for q in queries]
        answers: list[dict | RequestError | None] = [None] * len(queries)
        for i, (q, user) in enumerate(zip(queries, live)):
            if len(user.history) + len(q.append) > self.max_history:
                answers[i] = RequestError(413, f"user {q.user!r} would have {len(user.history) + len(q.append):,} "
                                               f"items, more than the server keeps per user ({self.max_history:,})")
        ok = [i for i, a in enumerate(answers) if a is None]
        if not ok:
            return answers
        queries, live = [queries[i] for i in ok], [live[i] for i in ok]
        if self.history_mode == "whole":
            self._load_states(live)
            self._step_states([q.append for q in queries], live)
            hidden = self.pool.state[1].index_select(0, torch.tensor([user.slot for user in live]))  # (B, d)
        else:
            for q, user in zip(queries, live):
                user.history.extend(q.append)
            _, hidden = self._encode([user.history for user in live])
        for q, user in zip(queries, live):
            q.history = list(user.history)
        for i, answer in zip(ok, self._rank(queries, hidden)):
            answers[i] = answer
        return answers

    def _live(self, q: Query) -> LiveUser:
        """The user's live entry (most recently used now), made from the training data or empty when new, and the
        least recently used users dropped beyond max_users."""
        user = self.users.pop(q.user, None)
        if user is None:
            known = self.user_index.get(q.user)
            user = LiveUser(history=[] if known is None else [int(i) for i in self.sequence(known)])
        self.users[q.user] = user
        while len(self.users) > self.max_users:
            dropped = self.users.popitem(last=False)[1]
            if self.pool is not None:
                self.dropped.append(dropped)
        return user

    def _load_states(self, live: list[LiveUser]) -> None:
        """A slot for each user without one, holding the state after their history: one encoding of the histories of
        the users of the training data (their first request), the empty state for the others."""
        new = [user for user in live if user.slot is None]
        if not new:
            return
        for user, slot in zip(new, self.pool.take(len(new))):
            user.slot = slot
        known, empty = [u for u in new if u.history], [u for u in new if not u.history]
        if known:
            self.pool.write(torch.tensor([u.slot for u in known]), list(self._encode([u.history for u in known])))
        if empty:
            self.pool.write(torch.tensor([u.slot for u in empty]), self.pool.empty(len(empty)))

    def _step_states(self, appends: list[list[int]], live: list[LiveUser]) -> None:
        """Carry each user's state over their appended items: position by position, every user with an item at that
        position in one batched step, read from and written back to the pool."""
        for t in range(max((len(a) for a in appends), default=0)):
            rows = [r for r, a in enumerate(appends) if len(a) > t]
            slots = torch.tensor([live[r].slot for r in rows])
            state, _ = self.pool.read(slots)
            self.pool.write(slots, list(self.encoder.step(state, torch.tensor([appends[r][t] for r in rows]))))
            for r in rows:
                live[r].history.append(appends[r][t])

    # ---- ranking -----------------------------------------------------------------------------------------------------
    def _rank(self, queries: list[Query], hidden: Tensor) -> list[dict]:
        """Top-K of each query from its hidden vector (B, d), as the module ranks (seen score, exclusion)."""
        score = self.model.seen_score
        seen = None  # (B, H): the users' items, which exclude_seen leaves out; built only when something reads them
        if score is not None or any(q.exclude_seen for q in queries):
            seen = self._padded([q.history for q in queries])
        seen_ids = None
        if score is not None:  # as the module ranks: the items the encoder read, and (scope history) the older ones
            reads_all = self.history_mode == "whole" and not self.bounded
            read = seen if reads_all else self._padded([self._window(q.history) for q in queries])
            seen_ids = score.seen_ids(read, seen)
        weight = score.weight if score is not None else None
        answers: list[dict | None] = [None] * len(queries)
        whole = [i for i, q in enumerate(queries) if q.candidates is None]
        if whole:
            rows = torch.tensor(whole)
            k = max(queries[i].k for i in whole)
            flags = torch.tensor([queries[i].exclude_seen for i in whole])
            exclude = seen[rows] * flags[:, None] if flags.any() else None  # a row of 0s (padding) excludes nothing
            _, scores, items = chunked_rank_and_top_k(hidden[rows], self.table, None, k,
                                                      None if seen_ids is None else seen_ids[rows], weight, exclude)
            for j, i in enumerate(whole):
                answers[i] = self._answer(items[j, : queries[i].k], scores[j, : queries[i].k])
        for i, q in enumerate(queries):
            if q.candidates is None:
                continue
            s = (hidden[i] @ self.table[q.candidates].T).float()  # (C,)
            if weight is not None:
                s = s + weight * torch.isin(q.candidates, seen_ids[i])
            if q.exclude_seen:
                s = s.masked_fill(torch.isin(q.candidates, seen[i]), float("-inf"))  # padding 0 is no candidate
            top = s.topk(min(q.k, len(s)))
            keep = torch.isfinite(top.values)
            answers[i] = self._answer(q.candidates[top.indices][keep], top.values[keep])
        return answers

    def _answer(self, items: Tensor, scores: Tensor) -> dict:
        raw = self.raw_items[items.numpy()].tolist()
        return {"items": raw, "scores": [round(float(s), 6) for s in scores]}


# ---- the server ---------------------------------------------------------------------------------------------------
@dataclass
class ServeSpec:
    """What each worker process needs to build the same `Recommender` (plain values: workers are spawned)."""

    cli_args: list[str]  # --config FILE ... and --model/--data overrides, as `m2rec predict` takes them
    ckpt_file: str
    history: History = "window"
    max_users: int = 100_000
    max_items: int = 10_000
    max_history: int = 100_000


def build_recommender(spec: ServeSpec) -> Recommender:
    """The config's model and datamodule, the checkpoint's weights (checked against the catalogue), in eval mode."""
    from .cli import make_cli

    cli = make_cli(spec.cli_args, run=False)
    model, data = cli.model, cli.datamodule
    data.prepare_data()
    data.setup("predict")
    model.load_trained(torch.load(spec.ckpt_file, map_location="cpu", weights_only=True), data.item_ids)
    return Recommender(model, data.item_ids, data.user_ids, data.sequence, spec.history, spec.max_users,
                       spec.max_items, spec.max_history)


def _error_response(err: RequestError):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": str(err)}, status_code=err.status)


class _API(ls.LitAPI):
    """One endpoint over a `Recommender` built in the worker process. Requests are checked one at a time in
    decode_request, so a bad one becomes its own 4xx answer instead of failing the batch it arrived in."""

    def __init__(self, spec: ServeSpec, threads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.serve_spec, self.threads = spec, threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        self.recommender = build_recommender(self.serve_spec)

    def check(self, request) -> Query | RequestError:
        try:
            return self.recommender.query(request)
        except RequestError as err:
            return err

    def batch(self, inputs: list) -> list:
        return inputs

    def unbatch(self, output: list) -> list:
        return output

    def predict(self, inputs: list) -> list:
        good = [i for i, q in enumerate(inputs) if isinstance(q, Query)]
        out = list(inputs)
        if good:
            for i, answer in zip(good, self.answer([inputs[i] for i in good])):
                out[i] = answer
        return out

    def encode_response(self, output):
        return _error_response(output) if isinstance(output, RequestError) else output


class RecommendAPI(_API):
    """POST /recommend: top-K for a history given in the request."""

    def decode_request(self, request: RecommendRequest) -> Query | RequestError:
        return self.check(request)

    def answer(self, queries: list[Query]) -> list[dict]:
        return self.recommender.recommend(queries)


class UsersAPI(_API):
    """POST /users: top-K for a live user, after appending the request's items."""

    def decode_request(self, request: UserRequest) -> Query | RequestError:
        return self.check(request)

    def answer(self, queries: list[Query]) -> list[dict | RequestError]:
        return self.recommender.users_step(queries)


def resolve_checkpoint(cli_args: list[str], ckpt_path: str, downloads: Path) -> str:
    """--ckpt_path best|last|FILE|URL -> a local file, as `m2rec predict` resolves it (best/last: this config's run
    on this dataset; URL: downloaded into `downloads`), opened once to check that it is a readable checkpoint."""
    from .checkpoint import CheckpointError, check_readable, download_checkpoint, is_url
    from .cli import make_cli

    if is_url(ckpt_path):
        path = str(download_checkpoint(ckpt_path, downloads))
    elif ckpt_path in ("best", "last"):
        path = make_cli(cli_args, run=False)._resolve_named(ckpt_path)
    elif Path(ckpt_path).is_file():
        path = str(Path(ckpt_path).resolve())
    else:
        raise CheckpointError(f"--ckpt_path {ckpt_path}: no such file (nor best, last or an http(s) URL)")
    check_readable(path, ckpt_path)
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="m2rec serve", description="Serve a checkpoint's top-K recommendations over HTTP (POST /recommend, POST "
        "/users, GET /health). Every other option (--config FILE, --model..., --data..., --run_dir) is taken as "
        "`m2rec predict` takes it.")
    p.add_argument("--ckpt_path", required=True, help="best, last, a file or an http(s) URL, as for m2rec predict")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--history", choices=["whole", "window"], default="window",
                   help="read a user's last max_len items, as training and predict do, or the whole history through "
                        "the recurrent state (an append is then one step)")
    p.add_argument("--max_users", type=int, default=100_000, help="live users kept; least recently used dropped")
    p.add_argument("--max_items", type=int, default=10_000, help="most items in one request")
    p.add_argument("--max_history", type=int, default=100_000, help="most items kept for one live user")
    p.add_argument("--max_batch_size", type=int, default=32, help="requests encoded together at most")
    p.add_argument("--batch_timeout", type=float, default=0.002,
                   help="seconds a request may wait for others to batch with")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a waiting request gets 504")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each inference worker; serving batches are small, and on a shared machine "
                        "more threads wait on each other (2 threads on 2 cores halved the requests/s of one)")
    return p


def serve(spec: ServeSpec, host: str, port: int, max_batch_size: int, batch_timeout: float,
          timeout: float, threads: int = 1) -> None:
    kw = {"max_batch_size": max_batch_size, "batch_timeout": batch_timeout, "threads": threads}
    server = ls.LitServer([RecommendAPI(spec, api_path="/recommend", **kw), UsersAPI(spec, api_path="/users", **kw)],
                          accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1,
                          timeout=timeout, max_payload_size=4 << 20)  # bytes: 413 beyond
    server.run(host=host, port=port, generate_client_file=False)


def main(argv: list[str]) -> None:
    args, cli_args = parser().parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="m2rec-ckpt-") as downloads:
        spec = ServeSpec(cli_args, resolve_checkpoint(cli_args, args.ckpt_path, Path(downloads)), args.history,
                         args.max_users, args.max_items, args.max_history)
        print(f"serving {spec.ckpt_file} on http://{args.host}:{args.port} (POST /recommend, POST /users, "
              "GET /health)", file=sys.stderr)
        serve(spec, args.host, args.port, args.max_batch_size, args.batch_timeout, args.timeout, args.threads)
