"""RetroPrompt (Chen et al., arXiv 2205.14704 / 2512.20145): prompt learning with a knowledge store built from
the training examples. The model-side pieces, generic over "representations" (an LM's prompt-position state,
or features from a frozen vision backbone through a trained head):

- ``prompt``: template + verbalizer -> p_model over the classes and the representation (any HF causal LM)
- ``store``: the knowledge store (normalised keys, exact FAISS inner product, refresh, leave-self-out)
- ``knn``: p_kNN, the kNN-guided loss, the interpolation at inference
- ``demos``: neural demonstrations (per class, a weighted sum of the top-m neighbours' representations)
"""
