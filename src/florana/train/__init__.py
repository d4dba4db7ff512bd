"""Local client training and evaluation on one shared base model (classification and causal LM)."""
