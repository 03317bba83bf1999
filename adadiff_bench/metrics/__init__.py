"""Quality metrics: FID, IS and KID in the digits-classifier and Inception feature spaces."""
from .classifier import (ASSET_PATH, EXTRACTOR_NAME, DigitsCNN, DigitsCNNExtractor, heldout_split,
                         load_classifier, main_train_classifier, train_digits_classifier)
from .quality import EXTRACTORS, HIGHER_IS_BETTER, compute_quality, resolve_inception_weights

__all__ = ["ASSET_PATH", "EXTRACTOR_NAME", "EXTRACTORS", "HIGHER_IS_BETTER", "DigitsCNN", "DigitsCNNExtractor",
           "compute_quality", "heldout_split", "load_classifier", "main_train_classifier",
           "resolve_inception_weights", "train_digits_classifier"]
