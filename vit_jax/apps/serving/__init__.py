"""`vit-jax serve`: the HTTP app (`app`), its options and errors (`protocol`), the batcher and URL
fetching.
"""
