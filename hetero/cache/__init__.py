from hetero.cache.pages import OFFLOADED, OutOfPages, PageAllocator, SeqPages
from hetero.cache.store import KVStore, MemoryReport

__all__ = ["OFFLOADED", "KVStore", "MemoryReport", "OutOfPages", "PageAllocator", "SeqPages"]
