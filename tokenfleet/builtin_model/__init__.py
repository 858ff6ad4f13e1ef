"""The builtin models, built on this machine by the project's own code (no model hub needed).

- `tokenizer`: the corpus every machine has (the standard library's source), the BPE tokenizer
  and the chat template both models share;
- `tiny_code`: the default model, `builtin://tiny-code`, a small Llama trained on that corpus
  for a fixed number of steps (same seed, same weights);
- `tiny_random`: `builtin://tiny-random`, random weights of the same architecture, for tests that
  do not care about output quality.

Where they are cached and how a spec's `model.source` resolves to a directory is
`tokenfleet.models`, which imports this package (never the other way round).
"""
