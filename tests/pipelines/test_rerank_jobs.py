"""Re-ranking through the real jobs: local features extracted and carried, DBA, the graph, --verify, feedback."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from index_builder.types import annoy as annoy_type
from pipelines import cli
from search.options import Rerank, SearchOptions
from search.searcher import Searcher

CLASSES = ("0", "1", "2", "3")
PER_CLASS = 10
ORIGINAL = "2/image_0165.jpg"


def _photos(flowers) -> list[str]:
    out = []
    for c in CLASSES:
        out += sorted(p.relative_to(flowers).as_posix() for p in (flowers / c).glob("*.jpg"))[:PER_CLASS]
    return out


def _copy_of(path) -> bytes:
    """A strongly edited copy: half the area, rotated, re-encoded small and at low quality."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    im = im.crop((w // 6, h // 5, w // 6 + int(w * 0.7), h // 5 + int(h * 0.7))).rotate(15, expand=True)
    im = im.resize((im.size[0] * 2 // 3, im.size[1] * 2 // 3))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=45)
    return buf.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory, flowers, mobilenet_spec, flowers_index):
    from pipelines import extract, index

    root = tmp_path_factory.mktemp("rerank")
    corpus = root / "corpus"
    photos = _photos(flowers)
    assert ORIGINAL in photos
    for rel in photos:
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(flowers / rel, corpus / rel)
    (corpus / "0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    copy = root / "copy.jpg"
    copy.write_bytes(_copy_of(flowers / ORIGINAL))
    features = extract.run(extract.ExtractConfig(input=str(corpus), output=str(root / "features"),
                                                 model=mobilenet_spec, local_features=128))
    rich = index.run(index.IndexConfig(features=str(root / "features"), output=str(root / "rich"), shards=2,
                                       dims=16, type_params={"annoy": annoy_type.Params(trees=5)}, dba=2, graph_k=6))
    (root / "plain").symlink_to(flowers_index[0], target_is_directory=True)  # built without local features
    return root, features, rich, flowers_index[1], len(photos)


def test_local_features_are_one_row_per_read_image_and_carried_into_the_shards(built):
    root, features, rich, plain, n = built
    assert features.counts.ok == n and features.counts.failed == 1
    assert features.local_features["rows"] == n + 1  # the broken file has a row, with its error
    assert features.local_features["with_keypoints"] == n
    table = pq.read_table(root / "features" / features.files["local"][0].path)
    broken = [r for r in table.to_pylist() if r["image_id"] == "0/broken.jpg"]
    assert broken[0]["keypoints"] == 0 and broken[0]["error"]
    assert rich.local_features["items_with_local_features"] == n
    assert all(f"shards/shard-{s:05d}/local_descriptors.npy" in rich.files for s in range(2))
    assert plain.local_features is None and not any("local_" in f for f in plain.files)


def test_verify_puts_the_original_of_an_edited_copy_first(built):
    from pipelines.query import run_query

    root = built[0]
    plain_rows, _, _ = run_query(str(root / "rich"), [str(root / "copy.jpg")], SearchOptions(k=5, method="exact"))
    rows, failures, _ = run_query(str(root / "rich"), [str(root / "copy.jpg")],
                                  SearchOptions(k=5, method="exact", rerank=Rerank(verify=40)))
    assert not failures
    top = rows[0]["results"][0]
    assert top["image_id"] == ORIGINAL and top["inliers"] >= 8, rows
    assert all("inliers" in r for r in rows[0]["results"])
    assert all("inliers" not in r for r in plain_rows[0]["results"])


def test_local_descriptor_votes_bring_in_an_original_the_global_search_missed(built):
    """The global vector points elsewhere (another class's photo); the copy's local descriptors still vote for it."""
    root, _, rich, _, _ = built
    assert rich.local_features["vote_index"]["file"] == "local_votes.faiss"
    assert all(f"shards/shard-{s:05d}/local_votes.faiss" in rich.files for s in range(2))
    with Searcher(str(root / "rich")) as s:
        local = s.query_local_features((root / "copy.jpg").read_bytes())
        original = s.find(ORIGINAL)
        voted, counts = s.vote_candidates(local, 3)
        assert voted[0] == original and counts[0] > counts[1:].max(initial=0)
        elsewhere = s.vectors_of(np.array([s.find("0/image_0001.jpg")]))[0]
        opts = SearchOptions(k=5, method="exact", rerank=Rerank(verify=5))
        top, _ = s.search_arrays(elsewhere[None, :], opts.replace(verify=0))
        assert original not in top[0]  # the global search alone cannot find it
        hits = s.search(elsewhere, opts, local=local)
        assert s.global_id(hits[0].shard, hits[0].id) == original and hits[0].inliers >= 8
        blind = s.search(elsewhere, opts.replace(verify_votes=False), local=local)
        assert original not in [s.global_id(h.shard, h.id) for h in blind]



def test_the_batch_api_honours_feedback_and_verification_as_one_query_does(built):
    """One query path for both: each row of a batch (cut into blocks) is what ``search`` answers for it alone,
    with marks, verification against the excluded item's own or given local features, and votes."""
    root = built[0]
    with Searcher(str(root / "rich")) as s:
        assert s.capabilities["votes"]
        gids = np.arange(0, s.size, 4, dtype=np.int64)[:7]
        vectors = s.vectors_of(gids)
        like, unlike = [int(gids[1]), int(gids[2])], [int(gids[3])]
        copy = s.query_local_features((root / "copy.jpg").read_bytes())
        local = [copy if row % 3 == 0 else None for row in range(len(gids))]  # None rows: the item's own
        cases = [SearchOptions(k=6, method="exact", batch_size=3, rerank=Rerank(verify=5)),
                 SearchOptions(k=6, method="hnsw", batch_size=3, rerank=Rerank(verify=8, verify_votes=False, qe=2)),
                 SearchOptions(k=5, method="exact", batch_size=4, rerank=Rerank(diffusion=True,
                                                                                diffusion_candidates=12))]
        for opts in cases:
            ranking = s.rank(vectors, opts, exclude=gids, like=like, unlike=unlike, local=local)
            batch = s.search_batch(vectors, opts, exclude=gids, like=like, unlike=unlike, local=local)
            ids, scores = s.search_arrays(vectors, opts, exclude=gids, like=like, unlike=unlike, local=local)
            assert np.array_equal(ids, ranking.ids) and np.array_equal(scores, ranking.scores)
            assert (ranking.inliers is None) == (not opts.rerank.verify)
            for row, gid in enumerate(gids.tolist()):
                alone = s.search(vectors[row], opts, exclude=gid, like=like, unlike=unlike, local=local[row])
                assert batch[row] == alone
                shown = ranking.ids[row][ranking.ids[row] >= 0]
                assert [s.global_id(h.shard, h.id) for h in alone] == shown.tolist()
                assert not set(shown.tolist()) & {gid, *unlike}  # excluded and rejected items never come back
                if opts.rerank.verify:
                    assert [h.inliers for h in alone] == [c if c >= 0 else None
                                                          for c in ranking.inliers[row][: len(shown)].tolist()]
        with pytest.raises(ValueError, match="local features"):  # nothing to verify against
            s.search_arrays(vectors[:1], cases[0])

def test_verify_without_local_features_is_refused_with_the_fix(built, capsys):
    root = built[0]
    code = cli.main(["query", "--index", str(root / "plain"), str(root / "copy.jpg"), "--verify", "5"])
    assert code == 2
    assert "--local-features" in capsys.readouterr().err


def test_dba_index_returns_each_item_first_for_its_own_plain_vector(built):
    """Stored vectors are augmented; a query is not: each item's own un-augmented vector still finds it."""
    from search.index_files import load_transform

    root, features, rich, _, n = built
    assert rich.dba["k"] == 2 and rich.graph["k"] == 6
    table = pq.read_table(root / "features" / features.files["features"][0].path)
    raw = np.stack(table.column("feature").to_numpy(zero_copy_only=False)).astype(np.float32)
    with Searcher(str(root / "rich")) as s:
        queries = load_transform(s.version_dir, s.manifest)(raw)
        own = np.asarray([s.find(i) for i in table.column("image_id").to_pylist()])
        stored = s.vectors_of(own)
        first, _ = s.search_arrays(stored, SearchOptions(k=1, method="exact"))
        assert (first[:, 0] == own).all()  # every stored item finds itself first
        ids, _ = s.search_arrays(queries, SearchOptions(k=3, method="exact"))
        assert (ids == own[:, None]).any(axis=1).all()  # its plain vector finds it among the top 3 ...
        assert (ids[:, 0] == own).mean() >= 0.9  # ... and first nearly always (near copies may swap)
        assert np.einsum("ij,ij->i", stored, queries).max() < 0.9999  # the stored vectors really are augmented


def test_diffusion_reorders_within_its_candidates_and_needs_the_graph(built):
    root = built[0]
    with Searcher(str(root / "rich")) as s, Searcher(str(root / "plain")) as p:
        assert s.capabilities["diffusion"] and s.capabilities["verify"]
        v = s.vector(0, 3)
        base = SearchOptions(k=10, method="exact")
        plain = {h.id for h in s.search(v, base.replace(k=20))}
        diffused = s.search(v, base.replace(diffusion=True, diffusion_candidates=20))
        assert len(diffused) == 10 and {h.id for h in diffused} <= plain
        with pytest.raises(ValueError, match="--graph-k"):
            p.search(p.vector(0, 0), diffusion=True)


def test_relevance_feedback_moves_results_toward_marked_items(built):
    root = built[0]
    with Searcher(str(root / "rich")) as s:
        q = s.find(ORIGINAL)
        first = s.search(s.vectors_of(np.array([q]))[0], SearchOptions(k=10, method="exact"), exclude=q)
        gids = [s.global_id(h.shard, h.id) for h in first]
        assert s.search(s.vectors_of(np.array([q]))[0], SearchOptions(k=10, method="exact"), exclude=q,
                        like=(), unlike=()) == first
        label = s.labels[q]
        like = [g for g in gids if s.labels[g] == label]
        unlike = [g for g in gids if s.labels[g] != label]
        second = s.search(s.vectors_of(np.array([q]))[0], SearchOptions(k=10, method="exact"), exclude=q,
                          like=like, unlike=unlike)
        hits = sum(s.labels[s.global_id(h.shard, h.id)] == label for h in second)
        assert hits >= len(like)


def test_neighbors_verify_adds_inlier_counts(built, tmp_path):
    from pipelines.neighbors import NeighborsConfig, read_neighbors, run
    from search.neighbors import NeighborOptions

    root, _, _, _, n = built
    opts = NeighborOptions(SearchOptions(k=4, method="exact", batch_size=64, rerank=Rerank(verify=4)))
    run(NeighborsConfig(index=str(root / "rich"), output=str(tmp_path / "nb"), options=opts, chunk_size=16))
    table = read_neighbors(str(tmp_path / "nb")).to_pylist()
    assert len(table) == n
    assert all(len(r["inliers"]) == len(r["neighbor_ids"]) for r in table)
    assert all(r["inliers"] == sorted(r["inliers"], reverse=True) for r in table)


def test_evaluate_reports_every_configuration_and_feedback_rounds(built, capsys):
    root = built[0]
    code = cli.main(["evaluate", "--index", str(root / "rich"), "--json", "--feedback-rounds", "2", "--verify", "5",
                     "--qe", "2", "--sample", "20"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    names = [c["name"] for c in report["configurations"]]
    assert names[0] == "exact" and any("diffusion" in x for x in names) and any("verification" in x for x in names)
    assert any("αQE" in x for x in names)
    for c in report["configurations"]:
        assert 0 <= c["map"] <= 1 and c["qps"] > 0 and c["index"]["dba"] == 2
    plain = report["configurations"][0]
    assert plain["map"] == pytest.approx(report["exact"]["map"])
    rounds = [r["p@10"] for r in report["feedback"]["precision"]]
    assert len(rounds) == 3 and rounds[2] > rounds[0]


def test_rejected_results_are_never_shown_again(built):
    """Even when nothing moves the query away from it (gamma 0, no kernel), a rejected result is left out."""
    from search.rerank import FeedbackWeights

    root = built[0]
    with Searcher(str(root / "plain")) as s:
        q = 11
        v = s.vectors_of(np.array([q]))[0]
        opts = SearchOptions(k=10, method="exact", feedback=FeedbackWeights(gamma=0.0, power=0.0))
        first = [s.global_id(h.shard, h.id) for h in s.search(v, opts, exclude=q)]
        after = [s.global_id(h.shard, h.id) for h in s.search(v, opts, exclude=q, unlike=[first[0]])]
        assert first[0] not in after and after[:9] == first[1:] and len(after) == 10
        ids, scores = s.feedback_arrays(v, [], [first[0], first[0]], opts, exclude=q)
        assert ids[0].tolist() == after and np.all(np.diff(scores[0]) <= 0)


def test_kernel_feedback_beats_rocchio_alone_on_the_dev_flowers(built):
    """Two simulated rounds on 120 flowers queries: the kernel on the marks ends with more relevant results."""
    from evaluation import rerank_eval
    from search.rerank import FeedbackWeights

    root = built[0]
    with Searcher(str(root / "plain")) as s:
        queries = np.arange(0, s.size, 6, dtype=np.int64)
        qv = s.vectors_of(queries)
        kernel = [r["p@10"] for r in rerank_eval.feedback_rounds(s, queries, qv, 2)]
        rocchio = [r["p@10"] for r in rerank_eval.feedback_rounds(s, queries, qv, 2, FeedbackWeights(power=0))]
    assert kernel[0] == rocchio[0]  # the same first list
    assert kernel[2] > rocchio[2] and kernel[2] - kernel[0] > 0.15, (kernel, rocchio)
