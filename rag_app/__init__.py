"""Medical question answering from retrieved evidence, with models that tune themselves."""
from .pipeline import RagPipeline, add_to_index, build_index
from .types import Answer, Chunk, Document, Source

__all__ = ["RagPipeline", "build_index", "add_to_index", "Answer", "Chunk", "Document", "Source"]
__version__ = "0.1.0"
