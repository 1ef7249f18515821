"""muppet-ray: pre-finetuning (Muppet, Aghajanyan et al. 2021) on Ray."""

__version__ = "0.1.0"
