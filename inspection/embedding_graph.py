"""A query embedder's chain (backbone, encoder, transform) as a differentiable graph.

:class:`search.embedder.Embedder` applies the index's transform (and autoencoder) from
the data the index carries; :func:`embedding_graph` builds the very same chain as
TensorFlow ops (:class:`models.inside.similarity.EmbeddingGraph`) from that data, for the tools
that need gradients of the product's similarity: "why it matched" maps and adversarial
examples. Only a local embedder has a model to differentiate; one that calls TF Serving
is refused.
"""

from __future__ import annotations

from typing import Any

from models.inside.similarity import EmbeddingGraph


def embedding_graph(embedder: Any, guided: bool = False) -> EmbeddingGraph:
    """The differentiable twin of ``embedder`` (a :class:`search.embedder.Embedder`)."""
    from search.embedder import Embedder

    if not isinstance(embedder, Embedder):
        raise ValueError(f"gradients need the model in this process, not {type(embedder).__name__} "
                         "(TF Serving): open the embedder with searcher.open_embedder()")
    transform = embedder._transform  # the index's VectorTransform (data), as the embedder applies it
    encoder = embedder._encode  # NumpyEncoder or None
    return EmbeddingGraph(embedder.backbone, transform.projection, transform.bias,
                          encoder=None if encoder is None else encoder.layers, guided=guided)
