"""Ground floor: artefact formats. Typed manifests of every kind, index layout, fingerprints, signing,
the transform as data. No Beam, no TensorFlow, nothing of ours."""
