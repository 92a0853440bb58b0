"""DeepSeek-V3-style MoE transformer (MLA + DeepSeekMoE) over residual streams."""

from mhc_train.model.config import ModelConfig, load_model_config
from mhc_train.model.transformer import LMOutput, MHCTransformer

__all__ = ["LMOutput", "MHCTransformer", "ModelConfig", "load_model_config"]
