"""`from draftapprox.reference_api import patch_model, SpecKVConfig, SpecPCConfig, SpecKVPCConfig`: the authors'
API over our methods (see `integrations.reference_api`)."""

from .integrations.reference_api import (
    DraftApproxLLMConfig,
    DraftApproxLLMModelOutput,
    SpecKVConfig,
    SpecKVPCConfig,
    SpecPCConfig,
    patch_model,
)

__all__ = ["DraftApproxLLMConfig", "DraftApproxLLMModelOutput", "SpecKVConfig", "SpecKVPCConfig", "SpecPCConfig",
           "patch_model"]
