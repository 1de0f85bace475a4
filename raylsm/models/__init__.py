"""Model zoo: the CTR model (``ctr``), its lifelong-interest modules and enhancements, configs and presets.

``raylsm.models.ctr.build_model(cfg, vocab)`` builds a model; ``raylsm.models.registry`` names its parts.
"""
