"""Phases of ``scripts/train_tiny_model.py`` (the entry point), one module per responsibility.

* ``common``    -- run clock, logging, phase timing, special-token ids;
* ``data``      -- corpora loading, held-out splits, synthetic stories from stories260K;
* ``tokenizer`` -- byte-level BPE training, tokenizer files, document encoding;
* ``train``     -- packed training stream, model config, training loop, saving;
* ``evaluate``  -- held-out loss / perplexity / bits-per-byte, reload checks, samples.

NOTE: this package stays free of heavy imports so that ``common.T_START`` (the run clock) is
set before numpy / torch load, as it was in the single-file script.
"""
