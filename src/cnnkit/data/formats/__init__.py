"""Readers and writers of the formats the ecosystem already uses (a converter is one reader
plus one writer)."""
