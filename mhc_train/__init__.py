"""mhc-train: pretraining DeepSeek-V3-style MoE models with baseline / HC / mHC residuals."""

__version__ = "0.1.0"
