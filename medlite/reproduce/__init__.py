"""Reproducing published experiments: recipes (``conf/experiment/paper/``), the published numbers
they are judged against (``published.yaml``), runs over seeds and the table beside the paper.

``python scripts/reproduce.py --list`` shows every recipe; ``python scripts/reproduce.py
medmnist_v2/breastmnist/resnet18_28`` runs one with the paper's protocol and writes
``reproduction.md``, ``.csv`` and ``.png``.
"""
