"""Evaluation: perplexity and bits per byte, lm-evaluation-harness tasks, the offline MMLU task."""
