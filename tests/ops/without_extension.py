"""The first lines of a fresh-interpreter script that imports fastabsld as if ``fastabsld._C`` were not built."""

BLOCK_EXTENSION = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fastabsld._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
"""
