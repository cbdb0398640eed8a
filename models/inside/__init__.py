"""Looking inside the network: layers, filters and ascent, DeepDream, saliency, adversarial examples,
picture tiles."""
