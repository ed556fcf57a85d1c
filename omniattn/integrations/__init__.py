"""omniattn inside other frameworks: ``omniattn.integrations.transformers.register()``.

Each integration imports its framework lazily, so ``import omniattn`` never needs them.
"""
