"""Command-line building blocks every subcommand shares: checked argument types and option groups.

Validation happens in argparse types, so a bad value is refused before any work with
argparse's own message, which names the option (``argument --batch-size: must be at
least 1, not 0``). Option groups that several commands take (the model, the search)
are defined once here and turned into the records the jobs take.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from index_builder.types import registry
from models.backbone.presets import PRESETS
from search.options import LSH_RADIUS, SearchOptions

SEARCH_METHODS = ("auto", *registry.SELECTABLE, "both", "exact")  # both: annoy+lsh


def _number(text: str, cast: Callable[[str], Any], what: str) -> Any:
    """``cast(text)``, or the one-line argparse error every numeric option gives."""
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}") from None


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(text, int, "an integer")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value

    parse.__name__ = f"integer ≥ {low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def fraction(text: str) -> float:
    value = _number(text, float, "a number")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def float_above(low: float) -> Callable[[str], float]:
    """A number strictly above ``low`` (e.g. a scale factor between octaves: above 1)."""
    def parse(text: str) -> float:
        value = _number(text, float, "a number")
        if value <= low:
            raise argparse.ArgumentTypeError(f"must be above {low:g}, not {value}")
        return value

    parse.__name__ = f"number > {low:g}"
    return parse


def non_negative_int_list(text: str) -> tuple[int, ...]:
    """Whole numbers ≥ 0 separated by commas, e.g. L∞ budgets ``0,1,2,4,8``."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers such as 0,1,2,4,8, not {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected whole numbers ≥ 0, not {text!r}")
    return values


def method_name(text: str) -> str:
    """A search method, ``both``, or method names joined by ``+`` (the union of their candidates)."""
    names = ["annoy", "lsh"] if text == "both" else text.split("+")
    unknown = [n for n in names if n not in SEARCH_METHODS or (len(names) > 1 and n in ("both", "auto"))]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a method: choose from {', '.join(SEARCH_METHODS)} or join names with '+'"
        )
    return text


def add_model_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--model", default=default,
                   help=f"preset ({', '.join(sorted(PRESETS))}) or savedmodel:PATH")
    p.add_argument("--weights-dir", default=None,
                   help="folder with Keras weights files by their Keras names (default $CBIR_WEIGHTS_DIR)")


def add_runtime_arg(p: argparse.ArgumentParser) -> None:
    """``--runtime``: how the backbone runs (models/backbone/runtimes.py); the vectors match Keras within 1e-4."""
    from models.backbone.runtimes import CHOICES, PARITY_TOLERANCE

    p.add_argument("--runtime", choices=CHOICES, default="auto",
                   help="run the backbone as keras, a traced graph, xla, or litert (XNNPACK); auto (default): on "
                        f"a GPU the graph, on a CPU litert when it converts and matches Keras within "
                        f"{PARITY_TOLERANCE:g}, else the graph")


def add_search_args(p: argparse.ArgumentParser, method: str = "auto", k: int = 10, rerank_flag: str = "--rerank"
                    ) -> None:
    """-k, --method, re-ranking, query expansion and per-method effort: one :class:`SearchOptions`.

    ``rerank_flag`` is ``--rerank`` (off by default) or ``--no-rerank`` (on by default).
    """
    p.add_argument("-k", type=positive_int, default=k, help=f"results per query (default {k})")
    p.add_argument("--method", type=method_name, default=method,
                   help=f"{', '.join(SEARCH_METHODS)}, or names joined by '+' (union, re-scored exactly); "
                        f"default {method}")
    if rerank_flag == "--rerank":
        p.add_argument("--rerank", action="store_true", help="re-score the candidates exactly")
    else:
        p.add_argument("--no-rerank", dest="rerank", action="store_false",
                       help="keep the method's own scores instead of re-scoring 4k candidates exactly")
    p.add_argument("--qe", type=non_negative_int, default=0, help="query expansion with the top N")
    p.add_argument("--qe-alpha", type=non_negative_float, default=0.0,
                   help="weight the expansion by similarity**A (0: plain average)")
    p.add_argument("--search-k", type=int, default=-1,
                   help="Annoy search_k (default: the value the index calibrated)")
    p.add_argument("--ef-search", type=non_negative_int, default=0,
                   help="HNSW efSearch (default: the value the index calibrated)")
    p.add_argument("--lsh-radius", type=int_at_least(0), default=LSH_RADIUS, help="largest MIH substring radius")
    p.add_argument("--lsh-candidates", type=non_negative_int, default=0,
                   help="LSH candidates per shard (default: the value the index calibrated, else 20k)")
    p.add_argument("--candidates", type=non_negative_int, default=0,
                   help="candidates per shard for every method (default: each method's own)")
    p.add_argument("--diffusion", action="store_true",
                   help="re-rank by diffusion over the index's k-NN graph (built with cbir index --graph-k)")
    p.add_argument("--diffusion-candidates", type=int_at_least(2), default=100,
                   help="how many first results diffusion re-orders (its cost depends on this, not the corpus)")
    p.add_argument("--verify", type=non_negative_int, default=0, metavar="N",
                   help="re-rank the top N by geometric verification inliers (needs extract --local-features), "
                        "with up to N more candidates the query's local descriptors vote for")
    p.add_argument("--no-verify-votes", action="store_true",
                   help="--verify only the global top N (no candidates from local-descriptor votes)")


def add_signing_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--signing-key", default=None, metavar="FILE",
                   help="refuse index versions not signed with this key (cbir index --signing-key)")


def signing_key(args: argparse.Namespace) -> bytes | None:
    from artefacts.signing import load_key

    return load_key(args.signing_key) if getattr(args, "signing_key", None) else None


def search_options(args: argparse.Namespace, **overrides) -> SearchOptions:
    fields = {
        "k": args.k, "method": args.method, "rerank": args.rerank, "qe": args.qe, "qe_alpha": args.qe_alpha,
        "search_k": args.search_k, "ef_search": args.ef_search, "lsh_radius": args.lsh_radius,
        "lsh_candidates": args.lsh_candidates, "candidates": args.candidates,
        "diffusion": getattr(args, "diffusion", False),
        "diffusion_candidates": getattr(args, "diffusion_candidates", 100),
        "verify": getattr(args, "verify", 0),
        "verify_votes": not getattr(args, "no_verify_votes", False),
    }
    if getattr(args, "feedback_weights", None) or getattr(args, "feedback_kernel", None):
        from search.rerank import FeedbackWeights

        text, kernel = getattr(args, "feedback_weights", None), getattr(args, "feedback_kernel", None)
        weights = FeedbackWeights.parse(text) if text else FeedbackWeights()
        fields["feedback"] = weights.with_kernel(kernel) if kernel else weights
    fields.update(overrides)
    return SearchOptions.from_dict(fields)
