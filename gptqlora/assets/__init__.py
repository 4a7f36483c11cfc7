"""Bundled assets: the tiny LLaMA test model (``tiny-llama/``) and synthetic data (``data/``).

Use :func:`gptqlora.data.assets.tiny_model_dir` and
:func:`gptqlora.data.assets.default_data_files` to locate them.
"""
