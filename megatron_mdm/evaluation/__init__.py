"""Evaluation on top of ``likelihood`` and ``sampling``: model loading, multiple-choice scoring, lm-eval.

``loading``: a Hugging Face directory -> (LogitsFn, tokenizer, mask_id, vocab_size);
``multiple_choice``: zero-shot scoring of (context, choices, gold) examples, reports;
``lm_eval_adapter``: the lm-eval harness model ``mdm`` (imports ``lm_eval``; install the ``eval`` extra).
Importing this package imports neither transformers nor lm_eval.
"""
