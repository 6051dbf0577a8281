"""Shared pytest setup: makes the checkout importable as top-level ``core`` (and ``tests.support``)."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
