"""castlib: keep file trees in sync across storage back-ends through a central SQL catalog."""
__version__ = "0.1.0"
