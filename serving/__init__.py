"""``cbir serve``: the search service (``app``), the version it follows (``versions``), thumbnails, the front end."""
