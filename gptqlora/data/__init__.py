"""Training data: prompt templates, record files, tokenization, batching and synthetic tasks.

- ``templates``: :class:`~gptqlora.data.templates.PromptTemplate` (bundled ``alpaca``,
  ``alpaca_short``, ``cot`` in ``templates/*.json``).
- ``records``: read + validate Alpaca / CoT / chat records from JSON or JSONL
  (:class:`~gptqlora.data.records.DataError` names file and line).
- ``tokenize``: :func:`~gptqlora.data.tokenize.encode_example` (exact prompt masking),
  :func:`~gptqlora.data.tokenize.encode_chat` (assistant turns only).
- ``collate``: :class:`~gptqlora.data.collate.DataCollator`, :func:`~gptqlora.data.collate.pack_examples`.
- ``dataset``: :func:`~gptqlora.data.dataset.build_datasets` (through ``datasets``, local files only).
- ``synthetic``: seeded arithmetic (CoT) and string (Alpaca) task generators and ``score``.
- ``assets``: :func:`~gptqlora.data.assets.tiny_model_dir`, :func:`~gptqlora.data.assets.default_data_files`.
"""
