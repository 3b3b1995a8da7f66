"""Data: tokenizers, sources, the memory-mapped token cache, packing into training batches."""

from longctx.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "Tokenizer", "load_tokenizer"]
