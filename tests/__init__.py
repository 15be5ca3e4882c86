"""Sections of test_all.py that live in modules of their own; test_all.py imports each with *."""
