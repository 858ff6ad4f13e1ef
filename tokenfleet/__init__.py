"""tokenfleet: serve LLMs on Kubernetes inside their SLAs."""

__version__ = "0.1.0"
