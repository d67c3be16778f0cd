"""Attention and KV-cache kernels. `kernels.torch_ref` holds the torch implementations that run
on any device and serve as the reference every faster kernel is tested against.

Imports no other Ember package.
"""
