"""The commands: quantize, finetune, merge, export, chat, generate (each with its options; cli.py dispatches)."""
