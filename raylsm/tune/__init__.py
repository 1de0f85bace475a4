"""Hyperparameter search: space files (:mod:`raylsm.tune.space`) and the Ray Tune driver (:mod:`raylsm.tune.search`)."""
