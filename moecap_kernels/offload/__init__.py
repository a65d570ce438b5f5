"""Offloaded experts (MoE-CAP's CA class) and routing over time.

- ``sequence``: routing sequences, one ``[T, k]`` routing per decode step, recorded or synthetic;
- ``stats``: what a sequence asks of a cache (distinct experts, working set, coverage, reuse);
- ``cache``: the exact hits, misses and evictions of LRU, LFU and Belady for C cached experts;
- ``tier``: experts in a slow tier (a file on disk read through the page cache) and its ceiling;
- ``run``: the timed run of a sequence with the cache, fetching misses, computing with a backend.
"""
