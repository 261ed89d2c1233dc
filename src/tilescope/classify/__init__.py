"""A few-shot tissue classifier on stored embeddings, trained from a few drawn regions.

Training tiles are the embedded tiles whose centre lies inside a class's regions (QuPath
annotations, or shapes drawn in napari); a tile inside regions of two classes is left out.
The model is scikit-learn's logistic regression on standardised embeddings with class-balanced
weights (``class_weight="balanced"``): each class counts the same however many tiles it has.

Accuracy is cross-validated **by region**: the training tiles of a class are split into
regions (tiles that touch on the tile grid, 8-connected, form one region, so two drawn shapes
that touch are one region) and whole regions are held out (``StratifiedGroupKFold``, up to 5
folds), so neighbouring tiles never sit on both sides of a split. It needs at least two regions
of every class; with fewer the classifier is still trained and its accuracy reported as not
measurable. Out-of-fold predictions give the accuracy and the balanced accuracy (the mean of
the per-class recalls).

A classifier is saved as JSON (never a pickle): classes, their colours, the linear model
(weights ``W`` (C, D) and bias ``b`` (C,), with the standardisation folded in, so
``probs = softmax(E @ W.T + b)``), the identity of the model whose embeddings it was trained on
(``weights_digest`` and the other keys a store's model must match for search), the grid, the
training regions and the cross-validation. Applying it to a store made with another model is
refused; another tile size or µm/px gives a `ClassifierWarning`.

Predictions are saved in the store as a score set (``scores/NAME``) that heatmaps and export
read like any other: arrays ``probs`` (N, C), ``uncertainty`` (N,) (entropy over classes /
log C: 0 sure, 1 undecided) and ``label`` (N,) int16 (-1 = not embedded), and meta with
``kind`` = "classifier", ``classes``, ``colors``, the model identity and the classifier's
training and cross-validation. Tiles not embedded (failed, or not reached) are NaN.
"""

from ._data import TrainingSet, training_set, training_set_from_geojson
from ._model import (
    CLASSIFIER_FORMAT,
    DEFAULT_C,
    Classifier,
    ClassifierError,
    ClassifierWarning,
    CrossValidation,
    cross_validate,
    model_identity,
    train,
)
from ._predict import Prediction, classify_store, predict, save_prediction

__all__ = [
    "CLASSIFIER_FORMAT",
    "DEFAULT_C",
    "Classifier",
    "ClassifierError",
    "ClassifierWarning",
    "CrossValidation",
    "Prediction",
    "TrainingSet",
    "classify_store",
    "cross_validate",
    "model_identity",
    "predict",
    "save_prediction",
    "train",
    "training_set",
    "training_set_from_geojson",
]
