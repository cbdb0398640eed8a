"""Offline evaluation: metrics, the quality gate, version comparison, re-ranking evaluation."""
