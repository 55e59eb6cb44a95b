"""rbee: a home-lab LLM inference cluster over plain SSH, driven from one shell."""

__version__ = "0.1.0"
