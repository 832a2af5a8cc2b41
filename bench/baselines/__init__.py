"""Minimal seed-style apps the benchmarks compare against (one `data:` frame per token)."""
