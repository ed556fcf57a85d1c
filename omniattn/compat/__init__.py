"""Drop-in entry points with other libraries' names, arguments, defaults and return values.

- :mod:`omniattn.compat.flash_attn`: flash-attn 2.8's ``flash_attn_func`` family and
  ``flash_attn_with_kvcache``;
- :mod:`omniattn.compat.generative_recommenders`: generative-recommenders' ``hstu_mha``.

Code written for those libraries runs on omniattn by changing one import.
"""
