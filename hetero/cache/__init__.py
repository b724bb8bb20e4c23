from hetero.cache.pages import OutOfPages, PageAllocator, PageTable
from hetero.cache.store import KVStore, MemoryReport

__all__ = ["KVStore", "MemoryReport", "OutOfPages", "PageAllocator", "PageTable"]
