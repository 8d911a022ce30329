"""RetroPrompt (Chen et al., arXiv 2205.14704 / 2512.20145): prompt learning with a knowledge store built from
the training examples. The model-side pieces, generic over "representations" (an LM's prompt-position state,
or features from a frozen vision backbone through a trained head):

- ``prompt``: template + verbalizer -> p_model over the classes and the representation (any HF causal LM)
- ``store``: the knowledge store (normalised keys, exact FAISS inner product, refresh, leave-self-out)
- ``knn``: p_kNN, the kNN-guided loss, the interpolation at inference
- ``demos``: neural demonstrations (per class, a weighted sum of the top-m neighbours' representations)
- ``memorization``: the memorization score (self-influence by LiSSA or an exact solve, Zheng & Jiang 2022),
  checked against exact leave-one-out retraining; the atypical (lowest kNN confidence) share (applied to a
  trained run by ``ralm.tuning.retroprompt_memo``, ``ralm retroprompt memo``)
- ``backbone``: the ``Backbone`` protocol the trainer is generic over, and ``TextBackbone`` (a ``PromptModel``
  with its trained parameters: full fine-tuning or a PEFT method)
- ``scoring``: a training step's loss and the inference probabilities over any backbone (the composition
  below); the trainer itself is ``ralm.tuning.retroprompt`` (``ralm retroprompt train`` / ``eval``)
- ``vision``: ``VisionBackbone``, frozen EfficientNet-Lite0 features through a trained head (images)

How a trainer composes them (train texts ``X`` with class indices ``y``; ``rows`` = the batch's own rows).
The store keys on prompts WITHOUT demonstrations, and every search (demonstrations, p_kNN) queries with the
same kind of representation, so keys and queries always match; with demonstrations on, that costs one
no-grad forward per batch::

    pm = PromptModel(model, tokenizer, PromptConfig(...))             # + virtual=... for prompt tuning
    store = KnowledgeStore(pm.represent(X), y, pm.n_classes, pm.verbalizer.classes)
    # a training step
    q = store.raw[rows]  # == pm.represent(X[rows]) until the model moves; pm.represent(X[rows]) is exact
    p_knn = store_knn_probs(store, q, cfg, rows=rows)                 # self left out if cfg.leave_self_out
    d = neural_demos(store, q, cfg.demos, rows=rows)                  # (B, C, d), self left out
    out = pm.forward(pm.batch(X[rows], demos=True), d)               # without demos: pm.batch(X[rows]), None
    knn_guided_loss(out.class_logits, y[rows], p_knn, cfg.beta).backward()
    # every epoch / N steps
    store.refresh(pm.represent(X))                                     # store.last_refresh_seconds: its cost
    # inference on a test text t (not in the store: rows=None)
    q = pm.represent([t])
    out = pm.forward(pm.batch([t], demos=True), neural_demos(store, q, cfg.demos))
    p = interpolate(out.class_logits.exp(), store_knn_probs(store, q, cfg), cfg.lmbda)

Without demonstrations ``out.reps`` is that same representation (no extra forward). The reference instead
reads p_kNN from the forward that carries the demonstrations.
"""
