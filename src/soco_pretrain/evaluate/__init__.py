"""Evaluating pretrained weights: object-level kNN (``knn``) and matched-budget comparisons (``compare``)."""
