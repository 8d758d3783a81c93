"""Data stage: import -> manifest -> validate -> preprocess (cached) -> augment -> Ray Data."""
