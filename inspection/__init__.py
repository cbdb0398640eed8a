"""Looking at results: match explanations, adversarial reports, collection maps, projector export, contact sheets."""
