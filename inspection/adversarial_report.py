"""How easily can an image be made to retrieve as something else? FGSM / PGD against an index, measured.

Over a seeded sample of indexed photos (each read from its ``uri`` and decoded exactly as
a query is), for each attack and budget ε (grey levels, :mod:`models.inside.adversarial`):

* **untargeted**: the photo is pushed away from its own embedding. ``self_hit@1`` is the
  fraction of photos that still retrieve themselves first; ``precision@10`` the fraction of
  their top 10 (the photo itself left out) that share its label;
* **targeted**: photo A is pushed towards another photo B (``--target random``: a random
  item of another label; or one ``image_id`` for every A). ``target_rank`` is where B
  lands in A's results (1 = the attack succeeded), searched ``depth`` deep.

ε = 0 is the clean baseline. Each adversarial image is then sent down the product's own
query path, as a client would: saved as uint8, encoded losslessly (PNG, ``direct``) and as
JPEG at each quality in ``jpeg_qualities``, decoded by :mod:`models.backbone.imaging` as every query
is (reduced-scale decode, resize), embedded and searched by the embedder and searcher the
service uses. ``survival`` says how much of the attack's effect (on ``self_hit@1`` for
untargeted, ``target_hit@1`` for targeted, against the clean image sent the same way) is
left after JPEG. Search is exact so that the numbers measure the embedding, not an
approximate index's recall.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from inspection.embedding_graph import embedding_graph
from inspection.sheet import fitted, letterbox
from models.inside import tiles
from models.inside.adversarial import ATTACKS, AttackOptions, attack

log = logging.getLogger(__name__)

GOALS = ("untargeted", "targeted")
TILE = 150


@dataclasses.dataclass(frozen=True)
class AdversarialConfig:
    attacks: tuple[str, ...] = ATTACKS
    eps: tuple[int, ...] = (0, 1, 2, 4, 8)
    target: str | None = "random"  # None: untargeted only; "random"; or one image_id
    sample: int = 20
    seed: int = 0
    attack: AttackOptions = AttackOptions()
    jpeg_qualities: tuple[int, ...] = (95, 75)
    k: int = 10  # precision@k
    depth: int = 100  # how deep the target is looked for
    pictures: int = 1  # pictures per attack and goal (the first photos of the sample)
    neighbours: int = 5  # results shown before and after in each picture

    def __post_init__(self) -> None:
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown or not self.attacks:
            raise ValueError(f"--attack: choose from {', '.join(ATTACKS)}, not {','.join(unknown) or 'nothing'}")
        if not self.eps or any(int(e) != e or e < 0 for e in self.eps):
            raise ValueError("--eps: whole grey levels ≥ 0, e.g. 0,1,2,4,8")
        if any(not 1 <= q <= 100 for q in self.jpeg_qualities):
            raise ValueError("JPEG qualities are between 1 and 100")
        if self.sample < 1 or self.k < 1 or self.depth < self.k:
            raise ValueError("sample and k must be at least 1, and depth at least k")


@dataclasses.dataclass
class AdversarialReport:
    report: dict[str, Any]
    pictures: dict[str, Image.Image]
    rankings: dict[tuple[str, str, int, str], np.ndarray]  # (attack, goal, eps, channel) → result ids (n, depth)
    sample_gids: np.ndarray
    clean_pixels: np.ndarray
    adversarial: dict[tuple[str, str, int], np.ndarray]  # the saved uint8 pixels of each attack


def encode(pixels: np.ndarray, quality: int | None) -> bytes:
    """What a client sends: PNG (lossless) for ``quality`` None, else JPEG at that quality (4:2:0, as Pillow's
    default)."""
    buf = io.BytesIO()
    if quality is None:
        Image.fromarray(pixels).save(buf, format="PNG")
    else:
        Image.fromarray(pixels).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _sample(searcher: Any, embedder: Any, n: int, seed: int, read_bytes: Callable[[str], bytes | None],
            exclude: set[int]) -> tuple[list[int], list[np.ndarray], int]:
    """The first ``n`` items of a seeded permutation whose file reads and decodes."""
    gids, pixels, unreadable = [], [], 0
    for g in np.random.default_rng(seed).permutation(searcher.size):
        if len(gids) >= n:
            break
        if int(g) in exclude:
            continue
        data = read_bytes(searcher.uris[int(g)])
        try:
            if data is None:
                raise ValueError("unreadable")
            pixels.append(embedder.decode(data))
            gids.append(int(g))
        except Exception:
            unreadable += 1
    if not gids:
        raise ValueError("no indexed image could be read back from its uri: the report needs the photos")
    return gids, pixels, unreadable


def _targets(searcher: Any, gids: list[int], target: str, seed: int) -> np.ndarray:
    """One target per sampled item: a random item of another label (or any other item without labels)."""
    if target != "random":
        return np.full(len(gids), _gid_of(searcher, target), np.int64)
    rng = np.random.default_rng(seed + 1)
    labels = np.asarray([str(x) for x in searcher.labels], dtype=object)
    out = []
    for g in gids:
        choices = np.flatnonzero(labels != labels[g]) if searcher.labels[g] is not None else np.array([], int)
        if not len(choices):
            choices = np.setdiff1d(np.arange(searcher.size), [g])
        out.append(int(rng.choice(choices)))
    return np.asarray(out, np.int64)


def _gid_of(searcher: Any, image_id: str) -> int:
    try:
        return searcher.image_ids.index(image_id)
    except ValueError:
        raise ValueError(f"the index has no item with image_id {image_id!r}") from None


def _metrics(ids: np.ndarray, vectors: np.ndarray, gids: np.ndarray, clean: np.ndarray, labels: list,
             targets: np.ndarray | None, target_vectors: np.ndarray | None, k: int) -> dict[str, Any]:
    depth = ids.shape[1]
    out: dict[str, Any] = {"self_hit@1": round(float(np.mean(ids[:, 0] == gids)), 4),
                           "cosine_to_clean": round(float(np.mean(np.sum(vectors * clean, axis=1))), 4)}
    precisions = []
    for row, g in zip(ids, gids, strict=True):
        if labels[g] is None:
            continue
        others = [i for i in row if i >= 0 and i != g][:k]
        precisions.append(sum(labels[i] == labels[g] for i in others) / k)
    out[f"precision@{k}"] = round(float(np.mean(precisions)), 4) if precisions else None
    if targets is not None:
        ranks = []
        for row, t in zip(ids, targets, strict=True):
            where = np.flatnonzero(row == t)
            ranks.append(int(where[0]) + 1 if len(where) else depth + 1)
        ranks_a = np.asarray(ranks)
        out.update({
            "target_rank_median": float(np.median(ranks_a)),  # depth + 1 means "not within depth"
            "target_ranks": ranks,
            "target_hit@1": round(float(np.mean(ranks_a == 1)), 4),
            f"target_hit@{k}": round(float(np.mean(ranks_a <= k)), 4),
            "cosine_to_target": round(float(np.mean(np.sum(vectors * target_vectors, axis=1))), 4),
        })
    return out


def _effect(metrics: dict[str, Any], baseline: dict[str, Any], goal: str) -> float:
    if goal == "untargeted":
        return baseline["self_hit@1"] - metrics["self_hit@1"]
    return metrics["target_hit@1"] - baseline["target_hit@1"]


@dataclasses.dataclass
class _Attack:
    """The sample under attack, how it is searched, and what the attacks left (keyed as in the report)."""

    searcher: Any
    embedder: Any
    graph: Any
    cfg: AdversarialConfig
    x: np.ndarray  # the sample's pixels
    gids: np.ndarray
    clean: np.ndarray  # the sample's embeddings
    targets: np.ndarray | None
    target_vectors: np.ndarray | None
    opts: Any
    channels: list[tuple[str, int | None]]
    rankings: dict[tuple[str, str, int, str], np.ndarray] = dataclasses.field(default_factory=dict)
    adversarial: dict[tuple[str, str, int], np.ndarray] = dataclasses.field(default_factory=dict)
    baselines: dict[tuple[str, str], dict[str, Any]] = dataclasses.field(default_factory=dict)

    def row(self, method: str, goal: str, eps: int) -> dict[str, Any]:
        """One attack at one budget, sent down every channel: its figures against the clean baseline."""
        targeted = goal == "targeted"
        adv = attack(self.graph, self.x, eps, method, targets=self.target_vectors if targeted else None,
                     anchors=self.clean, opts=self.cfg.attack)
        self.adversarial[(method, goal, eps)] = adv
        delta = int(np.abs(adv.astype(np.int16) - self.x.astype(np.int16)).max())
        row: dict[str, Any] = {"attack": method, "goal": goal, "eps": eps, "max_abs_delta": delta, "channels": {}}
        for name, quality in self.channels:
            vectors, ok, failures = self.embedder.embed_bytes([encode(a, quality) for a in adv])
            if len(ok) != len(adv):
                raise RuntimeError(f"{len(failures)} adversarial images failed the query path: {failures[:1]}")
            ids, _ = self.searcher.search_arrays(vectors, self.opts)
            self.rankings[(method, goal, eps, name)] = ids
            m = _metrics(ids, vectors, self.gids, self.clean, self.searcher.labels,
                         self.targets if targeted else None, self.target_vectors, self.cfg.k)
            if eps == 0:
                self.baselines[(goal, name)] = m
            base = self.baselines.get((goal, name))
            m["effect"] = round(_effect(m, base, goal), 4) if base else None
            row["channels"][name] = m
        direct = row["channels"]["direct"].get("effect")
        row["survival"] = {n: (round(row["channels"][n]["effect"] / direct, 4) if direct and direct > 0 else None)
                           for n, _ in self.channels[1:]}
        log.info("adversarial: %s %s eps %d: %s", method, goal, eps,
                 ", ".join(f"{n} self@1 {row['channels'][n]['self_hit@1']:.2f}" for n, _ in self.channels))
        return row

    def pictures(self, method: str, goal: str, top: int, read_bytes: Callable[[str], bytes | None]
                 ) -> dict[str, Image.Image]:
        """Before-and-after pictures of the first photos of the sample at the largest budget ``top``."""
        cfg, out = self.cfg, {}
        for i in range(min(cfg.pictures, len(self.gids))):
            name = f"{method}-{goal}-eps{top}" + (f"-{i + 1}" if cfg.pictures > 1 else "")
            out[name] = attack_picture(
                self.searcher, read_bytes, self.x[i], self.adversarial[(method, goal, top)][i], top,
                self.rankings[(method, goal, 0, "direct")][i], self.rankings[(method, goal, top, "direct")][i],
                int(self.gids[i]), None if goal == "untargeted" else int(self.targets[i]), cfg.neighbours,
                f"{method.upper()} {goal}, eps {top} grey levels")
        return out


def run_report(searcher: Any, embedder: Any, cfg: AdversarialConfig, read_bytes: Callable[[str], bytes | None]
               ) -> AdversarialReport:
    """The report (see the module docstring), its pictures, and the raw rankings behind it."""
    searcher.check_embedder(embedder)
    graph = embedding_graph(embedder)
    fixed_target = {_gid_of(searcher, cfg.target)} if cfg.target not in (None, "random") else set()
    gids_l, pixel_list, unreadable = _sample(searcher, embedder, cfg.sample, cfg.seed, read_bytes, fixed_target)
    x = np.stack(pixel_list)
    clean = graph.embed_numpy(x)
    targets = _targets(searcher, gids_l, cfg.target, cfg.seed) if cfg.target else None
    run = _Attack(searcher, embedder, graph, cfg, x, np.asarray(gids_l, np.int64), clean, targets,
                  searcher.vectors_of(targets) if targets is not None else None,
                  searcher.options(k=cfg.depth, method="exact"),
                  [("direct", None)] + [(f"jpeg{q}", q) for q in cfg.jpeg_qualities])
    goals = ["untargeted"] + (["targeted"] if targets is not None else [])
    eps_list = sorted({int(e) for e in cfg.eps})
    rows: list[dict[str, Any]] = []
    pictures: dict[str, Image.Image] = {}
    for method in cfg.attacks:
        for goal in goals:
            rows += [run.row(method, goal, eps) for eps in eps_list]
            if eps_list[-1] > 0:
                pictures.update(run.pictures(method, goal, eps_list[-1], read_bytes))
    gids = run.gids
    report = {
        "index": searcher.version_dir, "items": searcher.size, "model": embedder.spec.name,
        "sample": len(gids), "unreadable_skipped": unreadable, "seed": cfg.seed, "search": "exact",
        "k": cfg.k, "depth": cfg.depth, "target": cfg.target, "attack_options": dataclasses.asdict(cfg.attack),
        "channels": {n: ("lossless PNG" if q is None else f"JPEG quality {q}") for n, q in run.channels},
        "sample_image_ids": [searcher.image_ids[int(g)] for g in gids],
        "target_image_ids": None if targets is None else [searcher.image_ids[int(t)] for t in targets],
        "results": rows,
    }
    return AdversarialReport(report, pictures, run.rankings, gids, x, run.adversarial)


def _thumb(read_bytes: Callable[[str], bytes | None], uri: str, box: int) -> Image.Image:
    data = read_bytes(uri)
    try:
        return letterbox(fitted(data, box), box) if data else Image.new("RGB", (box, box), (200, 200, 200))
    except Exception:
        return Image.new("RGB", (box, box), (230, 180, 180))


def attack_picture(searcher: Any, read_bytes: Callable[[str], bytes | None], original: np.ndarray,
                   adversarial: np.ndarray, eps: int, before: np.ndarray, after: np.ndarray, gid: int,
                   target: int | None, n: int, title: str) -> Image.Image:
    """Original, perturbation (amplified to the full grey range), adversarial image [, target]; then the top ``n``
    results before and after. The photo itself is framed blue, the target red."""
    pad, cap, head = 6, 28, 22
    cols = max(n, 4)
    width = cols * (TILE + pad) + pad + 90
    sheet = Image.new("RGB", (width, head + 3 * (TILE + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((pad, 5), f"{title}: {searcher.image_ids[gid]}", fill=(0, 0, 0), font=font)
    delta = adversarial.astype(np.float32) - original.astype(np.float32)
    amplified = np.clip(128 + delta * (127.0 / max(1, eps)), 0, 255).astype(np.uint8)
    top_row = [(Image.fromarray(original), "original"), (Image.fromarray(amplified), f"perturbation x{127 // eps}"),
               (Image.fromarray(adversarial), "adversarial")]
    if target is not None:
        top_row.append((_thumb(read_bytes, searcher.uris[target], TILE), f"target {searcher.labels[target] or ''}"))

    def cell(i: int, r: int, im: Image.Image, text: str, frame: tuple[int, int, int] | None = None) -> None:
        x, y = 90 + pad + i * (TILE + pad), head + r * (TILE + cap + pad)
        tile = tiles.fit(im, TILE - 6, background=(245, 245, 245))
        sheet.paste(ImageOps.expand(tile, border=3, fill=frame or "white"), (x, y))
        draw.text((x + 2, y + TILE + 2), text[:24], fill=(30, 30, 30), font=font)

    for i, (im, text) in enumerate(top_row):
        cell(i, 0, im, text)
    for r, (ids, what) in enumerate(((before, "before"), (after, "after")), start=1):
        draw.text((pad, head + r * (TILE + cap + pad) + TILE // 2), what, fill=(0, 0, 0), font=font)
        for i, g in enumerate([int(v) for v in ids[:n] if v >= 0]):
            frame = (40, 90, 200) if g == gid else (200, 30, 30) if g == target else None
            cell(i, r, _thumb(read_bytes, searcher.uris[g], TILE), f"{i + 1}. {searcher.labels[g] or ''}", frame)
    return sheet


def markdown(report: dict[str, Any]) -> str:
    """The report as a table: one line per attack, goal and ε; one column group per channel."""
    names = list(report["channels"])
    k = report["k"]
    head = ["attack", "goal", "eps", "max|δ|"]
    for n in names:
        head += [f"{n} self@1", f"{n} P@{k}", f"{n} target@1", f"{n} target rank"]
    lines = [f"Adversarial report: {report['sample']} photos of {report['items']} ({report['model']}), exact search, "
             f"target ranks searched {report['depth']} deep ({report['depth'] + 1} = not found).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["results"]:
        cells = [row["attack"], row["goal"], str(row["eps"]), str(row["max_abs_delta"])]
        for n in names:
            m = row["channels"][n]
            p = m.get(f"precision@{k}")
            cells += [f"{m['self_hit@1']:.2f}", "-" if p is None else f"{p:.2f}",
                      "-" if "target_hit@1" not in m else f"{m['target_hit@1']:.2f}",
                      "-" if "target_rank_median" not in m else f"{m['target_rank_median']:g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
