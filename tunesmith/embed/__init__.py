"""Embedding models for retrieval: encoder loading (encoder.py), IR metrics (metrics.py), query/passage data
(data.py) and a seeded demo corpus (demo.py). The contrastive losses live in objectives/contrastive.py."""
