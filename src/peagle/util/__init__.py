"""Small utilities every stage uses: atomic files (`files`), the machine's matmul rate and allocator
setting (`machine`), PNG plots (`plots`), the cache root (`paths`)."""
