"""Job plumbing: the filesystem helper every file access goes through, the publish protocol, the
build lease, job metrics, progress."""
