"""What a search can be asked for: one record, grouped by the stage each knob belongs to.

:class:`SearchOptions` holds what every search needs (``k``, the method, candidates per
shard, the batch size) and three groups: :class:`Effort` (how hard each method searches),
:class:`Rerank` (the re-rankers that run after candidate generation) and
:class:`search.rerank.FeedbackWeights` (relevance feedback). The groups follow the query
path (``search.query_path``), so a stage reads its own group and nothing else.

Users never see the groups: the command line's flags, the service's JSON fields and
:meth:`SearchOptions.to_dict` use one flat vocabulary (``search_k``, ``qe``, ``verify``, …),
mapped onto the groups by :data:`FLAT`; :meth:`SearchOptions.from_dict` and
:meth:`SearchOptions.replace` take those flat names, so a report or a request written
before the grouping still reads the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from search.rerank import FeedbackWeights

LSH_RADIUS = 3  # largest MIH substring radius probed when nearer buckets hold too few candidates


@dataclasses.dataclass(frozen=True)
class Effort:
    """How hard each method searches; ``-1`` / ``0`` mean the value the index calibrated per shard.

    Each knob tunes one method only, so a union (``annoy+lsh``) can be tuned member by member.
    """

    annoy_search_k: int = -1  # Annoy's search_k: nodes inspected per query
    hnsw_ef_search: int = 0  # HNSW's efSearch: the candidate list of the graph walk
    lsh_candidates: int = 0  # LSH candidates per shard, re-scored exactly
    lsh_radius: int = LSH_RADIUS

    def of(self, option: str) -> int:
        """The effort an index type reads per call (its ``effort_option``); 0 asks for the calibrated one."""
        value = int(getattr(self, option, 0)) if option else 0
        return 0 if value == -1 else value


@dataclasses.dataclass(frozen=True)
class Rerank:
    """The re-rankers, in the order the query path runs them (``search.rerank``, ``search.verify``).

    ``exact`` re-scores each method's candidates from the stored vectors; ``qe`` / ``qe_alpha``
    expand the query with its top results and search again; ``diffusion`` re-orders the top
    ``diffusion_candidates`` by diffusion over the index's k-NN graph (``cbir index
    --graph-k``); ``verify`` re-orders the top N by geometric verification inliers (needs
    local features: ``cbir extract --local-features``), together with up to N more candidates
    the query's local descriptors vote for (``verify_votes``, on indexes with a vote index).
    """

    exact: bool = False
    qe: int = 0
    qe_alpha: float = 0.0  # α-weighted query expansion: weights similarity**alpha (0: plain average)
    diffusion: bool = False
    diffusion_candidates: int = 100
    verify: int = 0
    verify_votes: bool = True

    def validate(self) -> None:
        if self.qe < 0:
            raise ValueError(f"--qe must not be negative, not {self.qe}")
        if self.qe_alpha < 0:
            raise ValueError(f"--qe-alpha must not be negative, not {self.qe_alpha}")
        if self.verify < 0:
            raise ValueError(f"--verify must not be negative, not {self.verify}")
        if self.diffusion and self.diffusion_candidates < 2:
            raise ValueError(f"--diffusion-candidates must be at least 2, not {self.diffusion_candidates}")


# The flat names users know (flags, JSON fields, reports), in the order to_dict has always listed them:
# each is (group, field), group None for the record's own fields.
FLAT: dict[str, tuple[str | None, str]] = {
    "k": (None, "k"),
    "method": (None, "method"),
    "rerank": ("rerank", "exact"),
    "qe": ("rerank", "qe"),
    "qe_alpha": ("rerank", "qe_alpha"),
    "search_k": ("effort", "annoy_search_k"),
    "ef_search": ("effort", "hnsw_ef_search"),
    "lsh_radius": ("effort", "lsh_radius"),
    "lsh_candidates": ("effort", "lsh_candidates"),
    "candidates": (None, "candidates"),
    "batch_size": (None, "batch_size"),
    "diffusion": ("rerank", "diffusion"),
    "diffusion_candidates": ("rerank", "diffusion_candidates"),
    "verify": ("rerank", "verify"),
    "verify_votes": ("rerank", "verify_votes"),
    "feedback": (None, "feedback"),
}
_GROUPS = {"effort": Effort, "rerank": Rerank, "feedback": FeedbackWeights}


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """Everything a search can be asked for; every search entry point takes this one record.

    ``method`` is a method name (``exact``, ``annoy``, ``lsh``, ``hnsw``), ``auto`` (the
    fastest type the index has: HNSW, else Annoy), ``both`` (Annoy and LSH), or several names
    joined by ``+``: the union of their candidates, re-scored exactly. ``candidates`` (per
    shard) overrides each method's own default count. ``feedback`` weighs relevance-feedback
    marks (Rocchio and a kernel) when a search is given any.
    """

    k: int = 10
    method: str = "auto"  # hnsw when the index has it, else annoy
    candidates: int = 0
    batch_size: int = 1024
    effort: Effort = Effort()
    rerank: Rerank = Rerank()
    feedback: FeedbackWeights = FeedbackWeights()

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> SearchOptions:
        """Options from flat names (``to_dict``'s, the flags', the service's JSON); absent ones default."""
        return cls().replace(**fields)

    def replace(self, **changes: Any) -> SearchOptions:
        """A copy with fields changed, named flat (``qe=2``, ``search_k=…``) or as whole groups.

        ``rerank`` given a bool is the flat name (exact re-scoring), given a :class:`Rerank` the
        group; ``feedback`` may be a :class:`FeedbackWeights` or its ``to_dict`` form.
        """
        top: dict[str, Any] = {}
        grouped: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            group_type = _GROUPS.get(name)
            if group_type is not None and isinstance(value, group_type):
                top[name] = value
            elif name == "feedback" and isinstance(value, Mapping):
                top[name] = FeedbackWeights(**value)
            elif name in FLAT:
                group, field = FLAT[name]
                (top if group is None else grouped.setdefault(group, {}))[field] = value
            else:
                raise TypeError(f"unknown search option {name!r}")
        for group, fields in grouped.items():
            top[group] = dataclasses.replace(top.get(group, getattr(self, group)), **fields)
        return dataclasses.replace(self, **top) if top else self

    def methods(self) -> tuple[str, ...]:
        names = ("annoy", "lsh") if self.method == "both" else tuple(self.method.split("+"))
        return tuple(dict.fromkeys(n.strip() for n in names if n.strip()))

    def validate(self, available: tuple[str, ...]) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, not {self.k}")
        self.rerank.validate()
        names = self.methods()
        if not names:
            raise ValueError("no search method given")
        for name in names:
            if name not in available:
                raise ValueError(f"method {name!r} is not available here: this index has {', '.join(available)}")
        if "exact" in names and len(names) > 1:
            raise ValueError("exact search cannot be combined with other methods: it already finds the true top-k")

    def resolve(self, available: tuple[str, ...]) -> SearchOptions:
        """``auto`` replaced by the method this index answers best with; checked against ``available``."""
        opts = self
        if self.method == "auto":
            opts = dataclasses.replace(self, method="hnsw" if "hnsw" in available else "annoy")
        opts.validate(available)
        return opts

    def to_dict(self) -> dict[str, Any]:
        """The flat form (the names of :data:`FLAT`, in its order), as reports and answers record it."""
        out: dict[str, Any] = {}
        for name, (group, field) in FLAT.items():
            value = getattr(self if group is None else getattr(self, group), field)
            out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return out


__all__ = ["FLAT", "LSH_RADIUS", "Effort", "Rerank", "SearchOptions"]
