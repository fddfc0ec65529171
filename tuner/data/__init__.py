"""Dataset files to training examples: fetch, read, convert, render, encode, store, pack, cache."""
