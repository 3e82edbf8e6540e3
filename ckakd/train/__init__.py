"""Reference trainer pieces: model zoo, feature hooks (distillers, data and loop build on these)."""

from __future__ import annotations

from .hooks import FeatureHooks
from .models import create_model, list_models, register_model, unregister_model

__all__ = ["FeatureHooks", "create_model", "list_models", "register_model", "unregister_model"]
