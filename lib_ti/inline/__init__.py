"""Embedding math inside prompts: ``<'cat'+'dog'>`` and ``{'…'}`` as in the Embedding Merge extension.

:mod:`.scan` finds the expressions in a prompt, :mod:`.plan` evaluates them (cached) and rewrites the
prompt with temporary embedding names, :mod:`.infotext` writes and reads EM's ``EmbeddingMerge`` field.
No host imports: :mod:`lib_ti.host.inline` hooks these into the web UI.
"""
