"""``cbir serve`` against a real server on a free loopback port: searches, feedback, thumbnails, limits,
the token, and a version swap under concurrent requests that loses none and mixes none."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from _service_fixtures import copy_index, point_latest, two_versions
from PIL import Image

from search.options import SearchOptions
from search.searcher import Searcher
from serving.app import ServiceConfig, ServiceState, make_app
from serving.errors import TimedOut, Unavailable
from serving.server import ServiceThread
from serving.versions import OpenOptions, VersionFollower, open_version

K = 5


@dataclasses.dataclass
class Running:
    url: str
    follower: VersionFollower


@pytest.fixture(scope="module")
def built(tmp_path_factory, flowers_features, flowers_index):
    return two_versions(tmp_path_factory, flowers_features, flowers_index)


@pytest.fixture(scope="module")
def index_copy(built, tmp_path_factory):
    index = copy_index(built, tmp_path_factory.mktemp("served") / "index")
    point_latest(index, built["full"])
    return index


@pytest.fixture(scope="module")
def direct(index_copy, built):
    with Searcher(str(index_copy), version=built["full"]) as s:
        yield s


@pytest.fixture(scope="module")
def server(index_copy, weights_dir):
    follower = VersionFollower(str(index_copy), OpenOptions(weights_dir=weights_dir), poll_seconds=0)
    follower.start()
    config = ServiceConfig(workers=2, queue=8, max_upload_bytes=1 << 20, max_k=50)
    with ServiceThread(make_app(follower, config)) as thread:
        yield Running(thread.url, follower)


def post(url: str, body=None, **kw) -> requests.Response:
    return requests.post(url + "api/search", json=body, timeout=60, **kw) if body is not None else \
        requests.post(url + "api/search", timeout=60, **kw)


def ids(answer: dict) -> list[str]:
    return [r["image_id"] for r in answer["results"]]


def expected(s: Searcher, gid: int, k: int = K, exclude: bool = True, **opts) -> list[str]:
    hits = s.search(s.vectors_of(np.asarray([gid]))[0], s.options(SearchOptions(k=k), **opts),
                    exclude=gid if exclude else None)
    return [s.image_ids[s.global_id(h.shard, h.id)] for h in hits]


def photo(flowers: Path, rel: str = "3/image_0241.jpg") -> bytes:
    path = flowers / rel
    if not path.exists():
        path = sorted((flowers / "3").glob("*.jpg"))[0]
    return path.read_bytes()


def test_healthz_info_and_the_front_end(server, built):
    health = requests.get(server.url + "healthz", timeout=10).json()
    assert health["status"] == "ok" and health["version"] == built["full"] == health["latest"]
    assert health["error"] is None and health["items"] == 720
    info = requests.get(server.url + "api/info", timeout=10).json()
    assert info["version"] == built["full"] and info["dimension"] == 128 and info["images"] is True
    assert info["methods"][0] == "auto" and "exact" in info["methods"]
    page = requests.get(server.url, timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert 'src="static/app.js"' in page.text and "http" not in page.text  # nothing is fetched from elsewhere
    for name in ("app.js", "app.css"):
        assert requests.get(server.url + f"static/{name}", timeout=10).status_code == 200


def test_search_by_id_is_the_searchers_answer_and_names_its_version(server, direct, built):
    gid = 123
    image_id = direct.image_ids[gid]
    for body, exclude in (({"image_id": image_id, "k": K, "method": "exact"}, True),
                          ({"image_id": image_id, "k": K, "method": "exact", "include_self": True}, False),
                          ({"image_id": image_id, "k": K, "method": "annoy", "rerank": True}, True)):
        r = post(server.url, body)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["version"] == built["full"] == r.headers["X-Index-Version"]
        opts = {k: v for k, v in body.items() if k in ("method", "rerank")}
        assert ids(answer) == expected(direct, gid, exclude=exclude, **opts)
        assert (image_id in ids(answer)) == (not exclude)
        assert all(isinstance(x["score"], float) and x["label"] for x in answer["results"])
        assert "uri" not in answer["results"][0]


def test_search_by_vector_equals_search_by_id(server, direct):
    gid = 321
    vector = direct.vectors_of(np.asarray([gid]))[0].tolist()
    by_vector = post(server.url, {"vector": vector, "k": K, "method": "exact"}).json()
    by_id = post(server.url, {"image_id": direct.image_ids[gid], "k": K, "method": "exact",
                              "include_self": True}).json()
    assert ids(by_vector) == ids(by_id) and ids(by_vector)[0] == direct.image_ids[gid]


def test_search_by_uploaded_image_finds_that_photo(server, direct, flowers):
    data = photo(flowers)
    options = json.dumps({"k": K, "method": "exact"})
    r = post(server.url, files={"image": ("query.jpg", data, "image/jpeg")}, data={"options": options})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["query"] == {"upload": "query.jpg", "bytes": len(data)}
    top = answer["results"][0]
    assert top["image_id"].startswith("3/") and top["score"] > 0.99  # the very photo, stored as float16
    embedder = server.follower.current.embedder  # the service's own, loaded once
    vectors, _, failures = embedder.embed_bytes([data])
    assert not failures
    hits = direct.search(vectors[0], direct.options(SearchOptions(k=K, method="exact")))
    assert ids(answer) == [direct.image_ids[direct.global_id(h.shard, h.id)] for h in hits]
    assert answer["timings_ms"]["embed"] > 0


def test_feedback_marks_move_the_results(server, direct):
    gid = 40
    body = {"image_id": direct.image_ids[gid], "k": 10, "method": "exact"}
    plain = ids(post(server.url, body).json())
    unliked, liked = plain[0], plain[-1]
    marked = post(server.url, {**body, "like": [liked], "unlike": [unliked]}).json()
    assert marked["feedback"] == {"like": [liked], "unlike": [unliked]}
    after = ids(marked)
    assert after != plain
    assert unliked not in after or after.index(unliked) > 0  # pushed away from the query
    assert liked in after and after.index(liked) <= plain.index(liked)  # pulled toward it
    again = ids(post(server.url, {**body, "like": [liked], "unlike": [unliked]}).json())
    assert again == after  # the same marks give the same answer


def test_item_metadata_and_thumbnails(server, direct, flowers):
    image_id = direct.image_ids[7]
    item = requests.get(server.url + "api/item", params={"id": image_id}, timeout=10).json()
    assert item["image_id"] == image_id and item["label"] == direct.labels[7] and item["uri"] == direct.uris[7]
    r = requests.get(server.url + "api/thumb", params={"id": image_id, "size": 96}, timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    original = Image.open(direct.uris[7])
    assert max(thumb.size) == 96 and abs(thumb.size[0] / thumb.size[1] - original.size[0] / original.size[1]) < 0.05
    again = requests.get(server.url + "api/thumb", params={"id": image_id, "size": 96}, timeout=30)
    assert again.content == r.content
    missing = requests.get(server.url + "api/thumb", params={"id": "nope.jpg"}, timeout=10)
    assert missing.status_code == 404 and "nope.jpg" in missing.json()["error"]
    assert requests.get(server.url + "api/item", params={"id": "nope.jpg"}, timeout=10).status_code == 404
    too_big = requests.get(server.url + "api/thumb", params={"id": image_id, "size": 5000}, timeout=10)
    assert too_big.status_code == 400 and "512" in too_big.json()["error"]


def test_why_it_matched_is_offered_when_the_explainer_imports(server, direct):
    import importlib.util

    info = requests.get(server.url + "api/info", timeout=10).json()
    assert info["explain"] == (importlib.util.find_spec("inspection.explain") is not None)
    if not info["explain"]:
        assert requests.post(server.url + "api/explain", timeout=10).status_code == 404
        return
    query, result = direct.image_ids[10], direct.image_ids[11]
    form = {"query_id": (None, query), "result_id": (None, result), "method": (None, "gradient")}
    r = requests.post(server.url + "api/explain", files=form, timeout=120)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png", r.text
    assert Image.open(io.BytesIO(r.content)).format == "PNG"
    r = requests.post(server.url + "api/explain", files={"query_id": (None, query)}, timeout=10)
    assert r.status_code == 400 and "result_id" in r.json()["error"]
    r = requests.post(server.url + "api/explain", files={**form, "result_id": (None, "nope.jpg")}, timeout=10)
    assert r.status_code == 400 and "no item 'nope.jpg'" in r.json()["error"]


def test_a_thumbnail_of_a_file_changed_since_indexing_is_refused(tmp_path):
    from serving.thumbnails import ThumbnailCache, ThumbnailUnavailable

    path = tmp_path / "a.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(path)
    cache = ThumbnailCache()
    import hashlib

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert Image.open(io.BytesIO(cache.get(str(path), digest, 64))).size == (64, 43)
    Image.new("RGB", (300, 200), (200, 10, 30)).save(path)
    with pytest.raises(ThumbnailUnavailable, match="changed since it was indexed"):
        cache.get(str(path), digest, 32)
    os.symlink(path, tmp_path / "link.png")
    with pytest.raises(ThumbnailUnavailable, match="symbolic link"):
        cache.get(str(tmp_path / "link.png"), None, 32)


@pytest.mark.parametrize("body,raw,fragment", [
    (None, b"{not json", "not valid JSON"),
    (None, b"[1, 2]", "JSON object"),
    ({"image_id": "nope.jpg"}, None, "no item 'nope.jpg'"),
    ({"image_id": "0/image_0001.jpg", "k": 0}, None, "k must be between 1 and 50"),
    ({"image_id": "0/image_0001.jpg", "k": 51}, None, "k must be between 1 and 50"),
    ({"image_id": "0/image_0001.jpg", "k": "5"}, None, "k must be an integer"),
    ({"image_id": "0/image_0001.jpg", "method": "hnws"}, None, "method 'hnws' is not available"),
    ({"image_id": "0/image_0001.jpg", "kk": 3}, None, "unknown field(s) kk"),
    ({"image_id": "0/image_0001.jpg", "vector": [1.0]}, None, "exactly one query"),
    ({}, None, "exactly one query"),
    ({"vector": [1.0, 2.0]}, None, "this index's vectors have 128"),
    ({"vector": [0.0] * 128}, None, "not all zeros"),
    ({"image_id": "0/image_0001.jpg", "like": ["nope.jpg"]}, None, "like: no item 'nope.jpg'"),
    ({"image_id": "0/image_0001.jpg", "like": ["0/image_0002.jpg"], "unlike": ["0/image_0002.jpg"]}, None,
     "both relevant and not relevant"),
    ({"image_id": "0/image_0001.jpg", "rerank": "yes"}, None, "rerank must be true or false"),
    ({"image_id": "0/image_0001.jpg", "verify": True}, None, "carries no local features"),
    ({"image_id": "0/image_0001.jpg", "diffusion": True}, None, "has no k-NN graph"),
    ({"image_id": "0/image_0001.jpg", "feedback_weights": [1, 2]}, None, "three non-negative numbers"),
])
def test_bad_requests_are_400_with_a_message(server, body, raw, fragment):
    if raw is not None:
        r = requests.post(server.url + "api/search", data=raw, headers={"Content-Type": "application/json"}, timeout=10)
    else:
        r = post(server.url, body)
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    message = r.json()["error"]
    assert fragment in message and "Traceback" not in r.text


def test_uploads_that_are_not_images_or_too_large(server):
    r = post(server.url, files={"image": ("x.jpg", b"this is text with a .jpg name", "image/jpeg")})
    assert r.status_code == 400 and "not a usable image" in r.json()["error"]
    r = post(server.url, files={"image": ("x.jpg", b"", "image/jpeg")})
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = post(server.url, files={"image": ("x.jpg", b"\xff" * 100, "image/jpeg")}, data={"options": "{oops"})
    assert r.status_code == 400 and "'options' field is not valid JSON" in r.json()["error"]
    big = os.urandom((1 << 20) + 1000)
    r = post(server.url, files={"image": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413 and "larger than the limit of 1048576 bytes" in r.json()["error"]
    r = requests.post(server.url + "api/search", data=b"x" * 100, headers={"Content-Type": "text/plain"}, timeout=10)
    assert r.status_code == 400 and "application/json" in r.json()["error"]


def test_unknown_routes_and_methods_answer_json(server):
    r = requests.get(server.url + "api/nothing", timeout=10)
    assert r.status_code == 404 and "no such route" in r.json()["error"]
    r = requests.get(server.url + "api/search", timeout=10)
    assert r.status_code == 405 and "not allowed" in r.json()["error"]


def test_a_token_guards_the_api_but_not_the_health_check(index_copy, tmp_path):
    from pipelines.serve import read_token

    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-of-some-length\n")
    token = read_token(str(token_file))
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ValueError, match="at least 16 characters"):
        read_token(str(short))
    follower = VersionFollower(str(index_copy), OpenOptions(images=False), poll_seconds=0)
    follower.start()
    with ServiceThread(make_app(follower, ServiceConfig(workers=1, token=token))) as thread:
        url = thread.url
        assert requests.get(url + "healthz", timeout=10).status_code == 200
        assert requests.get(url, timeout=10).status_code == 200  # the page itself asks for the token
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"},
                        {"Authorization": f"Bearer {token}x"}):
            r = requests.get(url + "api/info", headers=headers, timeout=10)
            assert r.status_code == 401 and "bearer token" in r.json()["error"]
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        ok = requests.get(url + "api/info", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert ok.status_code == 200 and ok.json()["images"] is False
        r = requests.post(url + "api/search", files={"image": ("x.jpg", b"123", "image/jpeg")},
                          headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 503 and "--no-images" in r.json()["error"]


def test_overload_is_503_at_once_and_a_timeout_keeps_the_version_until_the_work_ends(index_copy):
    follower = VersionFollower(str(index_copy), OpenOptions(images=False), poll_seconds=0)
    served = follower.start()
    state = ServiceState(follower, ServiceConfig(workers=1, queue=1, timeout_seconds=0.3))
    release = threading.Event()
    ran = []

    def blocking(version, seconds):
        ran.append(seconds)
        release.wait(seconds)
        return version.version

    async def scenario():
        slow = asyncio.ensure_future(state.run(blocking, 5))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(state.run(blocking, 1))  # waits behind the slow one
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        with pytest.raises(Unavailable, match="busy"):
            await state.run(blocking, 0)
        assert time.perf_counter() - started < 0.05
        for waiting in (slow, queued):
            with pytest.raises(TimedOut, match="limit of 0.3s"):
                await waiting
        assert served.refs == 2 and state.in_flight == 2  # the search still runs: its lease is held
        release.set()
        for _ in range(100):
            if state.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert served.refs == 0 and state.in_flight == 0
        assert ran == [5]  # the queued request's time ran out before a worker was free: never started
        assert await state.run(blocking, 0) == served.version

    try:
        asyncio.run(scenario())
    finally:
        state.close()
    assert served.closed


def _corrupt_copy(index: Path, version: str, name: str) -> None:
    """A version folder named ``name`` whose manifest is right but one vectors file was changed."""
    import shutil

    shutil.copytree(index / version, index / name)
    manifest = json.loads((index / name / "MANIFEST.json").read_text())
    manifest["version"] = name
    (index / name / "MANIFEST.json").write_text(json.dumps(manifest))
    vectors = index / name / "shards" / "shard-00000" / "vectors.f16.npy"
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF
    vectors.write_bytes(bytes(data))


def test_a_version_swap_under_concurrent_requests_loses_none_and_mixes_none(built, tmp_path):
    index = copy_index(built, tmp_path / "index")
    point_latest(index, built["full"])
    opened = []

    def opener(version: str):
        opened.append(open_version(str(index), version, OpenOptions(images=False)))
        return opened[-1]

    follower = VersionFollower(str(index), poll_seconds=0, opener=opener)
    first = follower.start()
    truth = {}
    for name in ("full", "subset"):
        with Searcher(str(index), version=built[name]) as s:
            truth[built[name]] = {s.image_ids[g]: expected(s, g, method="exact") for g in range(0, s.size, 7)
                                  if s.labels[g] != "8"}
    queries = sorted(set.intersection(*(set(t) for t in truth.values())))
    with ServiceThread(make_app(follower, ServiceConfig(workers=2, queue=64))) as thread:
        url = thread.url
        swapped = threading.Event()

        def client(worker: int) -> list[tuple[int, str, list[str], str]]:
            out = []
            session = requests.Session()
            for i in range(worker, worker + 60):
                image_id = queries[i % len(queries)]
                r = session.post(url + "api/search", json={"image_id": image_id, "k": K, "method": "exact"},
                                 timeout=60)
                answer = r.json() if r.headers.get("Content-Type", "").startswith("application/json") else {}
                out.append((r.status_code, answer.get("version"), ids(answer) if "results" in answer else [],
                            image_id))
                if i == worker + 20:
                    swapped.wait(30)  # a third of each client's requests before the swap finished
            return out

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client, w) for w in range(4)]
            time.sleep(0.3)
            point_latest(index, built["subset"])
            assert follower.check() == built["subset"]
            swapped.set()
            answers = [a for f in futures for a in f.result()]
        assert len(answers) == 240 and all(status == 200 for status, *_ in answers)  # none lost
        versions = {v for _, v, _, _ in answers}
        assert versions == {built["full"], built["subset"]}
        for _, version, got, image_id in answers:  # none mixed: each answer is its own version's
            assert got == truth[version][image_id], (version, image_id)
        assert first.closed and first.refs == 0  # the old version was closed once its requests ended
        health = requests.get(url + "healthz", timeout=10).json()
        assert health["status"] == "ok" and health["version"] == built["subset"] and health["swaps"] == 2

        # a version that fails verification is not swapped in, and the error is visible
        bad = "v20990101T000000-badbad"
        _corrupt_copy(index, built["subset"], bad)
        point_latest(index, bad)
        assert follower.check() is None
        health = requests.get(url + "healthz", timeout=10).json()
        assert health["status"] == "behind" and health["version"] == built["subset"] and health["latest"] == bad
        assert health["error"]["version"] == bad and health["error"]["error"] == "IndexIntegrityError"
        assert "do not match the manifest" in health["error"]["message"]
        r = requests.post(url + "api/search", json={"image_id": queries[0], "k": K, "method": "exact"}, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == built["subset"]
        assert follower.check() is None  # not retried while LATEST still names it
        point_latest(index, built["full"])  # a rollback is followed like any other change
        assert follower.check() == built["full"]
        assert requests.get(url + "healthz", timeout=10).json()["status"] == "ok"
    # a version that finishes opening after the service stopped is closed, not served
    point_latest(index, built["subset"])
    assert follower.check() is None and follower.current is None
    assert opened[-1].version == built["subset"] and opened[-1].closed
