"""Publishing a model: its card (card.py), the folder formats (export.py), the Hub (push.py)."""
