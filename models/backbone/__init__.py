"""The backbone and its runtimes: presets, weights, decoding (and its in-graph twin), the network,
runtimes, the TF Serving export, local features."""
