"""Rendering of results: text tables, JSON, HTML. No computation happens here."""
